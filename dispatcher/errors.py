"""The errors the dispatcher raises on purpose, by the family a caller catches.

Every one carries a message fit for one line, naming what failed and, when the user can
act on it, what to do. The ``dispatcher`` command prints ``dispatcher: <family>: <message>``
and exits with the family's code (see ``dispatcher --help``)::

    DispatcherError                 (catch-all of the errors below; exit code 1)
    ├── ConfigurationError          a setting or a file it names is wrong; exit code 2
    │   ├── settings.SettingsError  a DISPATCHER_* variable has a bad value
    │   └── catalog.CatalogError    the entity catalog file is unreadable or malformed
    ├── DatabaseUnavailable         PostgreSQL cannot be reached, refused the login or
    │                               timed out (db.connect, db.create_pool); exit code 3
    ├── KafkaUnavailable            Kafka refused what the daemon needs of it (creating
    │                               its topics); exit code 4
    └── events.InvalidEvent         a Kafka message breaks the event contract; it goes to
                                    the dead-letter topic, never up to the command

``SettingsError``, ``CatalogError`` and ``InvalidEvent`` are also subclasses of
``ValueError``, as they were before this hierarchy: code catching ``ValueError`` is unchanged.

Brokers that cannot be reached are not an error: the daemon waits for them with backoff
(and fails ``/readyz`` meanwhile), so ``KafkaUnavailable`` means Kafka answered and said
no. No command other than ``run`` talks to Kafka.
"""

from __future__ import annotations


class DispatcherError(Exception):
    """Base of every error the dispatcher raises on purpose; catch it to report any of them."""


class ConfigurationError(DispatcherError):
    """A setting or a file it names is wrong: fix the one the message names, then restart."""


class DatabaseUnavailable(DispatcherError):
    """PostgreSQL cannot be reached or refused the login: start it or fix the database URL."""


class KafkaUnavailable(DispatcherError):
    """Kafka refused what the daemon needs (e.g. creating a topic): fix the broker or its ACLs."""
