"""Shared fixtures: a mosquitto and a Kafka-compatible broker of the tests' own, per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import support


@pytest.fixture(scope="session")
def mqtt_port() -> Iterator[int]:
    with support.mosquitto() as port:
        yield port


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    with support.kafka_broker() as bootstrap:
        yield bootstrap


@pytest.fixture
def topic_prefix() -> str:
    return support.unique_topic_prefix()
