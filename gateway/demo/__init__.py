"""The demo: a simulated shop floor (:mod:`gateway.demo.simulator`) and the local stack that
runs the gateway against it (``digispine-gateway demo``)."""
