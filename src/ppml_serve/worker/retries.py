"""When a request stops being retried: the dead-letter decision, kept out of the worker loop."""

from __future__ import annotations

from dataclasses import dataclass

from ppml_serve.queue.contract import Delivery


@dataclass(frozen=True)
class RetryPolicy:
    """A request is retried (re-delivered to a worker) until it has been delivered
    ``max_deliveries`` times; then it goes to the dead-letter stream and its caller gets an
    error. Deliveries count every hand-out: to a worker that crashed, froze, or failed it."""

    max_deliveries: int

    def dead_letter_reason(self, delivery: Delivery) -> str | None:
        """Why ``delivery`` must be set aside, or ``None`` to process it (again)."""
        if delivery.deliveries > self.max_deliveries:
            return f"delivered {delivery.deliveries} times without an answer"
        return None
