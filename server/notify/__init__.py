"""Reaching people: the outbox sender and its receivers (webhook, Slack, e-mail).

No SQL here: the outbox lives in the store (`server/store/`), and the sender reads and marks it
through the store's interface. Receivers only render a notice and hand it to the outside."""
