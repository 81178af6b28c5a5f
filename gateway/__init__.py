"""DigiSpine Edge Gateway: shop-floor signals in, CloudEvents DomainEvents out to Kafka."""

__version__ = "0.1.0"
