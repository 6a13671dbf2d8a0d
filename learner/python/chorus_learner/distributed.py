"""Training over several processes (`torchrun`): rank 0 serves the gRPC service and decides
what to do; every rank does it. `Leader` wraps rank 0's trainer so that each call is first
broadcast to the other ranks, which run `follow` and make the same call on their own trainer
(FSDP2 shards parameters, gradients and optimizer state over them; each computes its share of
the batch's sequences)."""

import torch.distributed as dist


class Leader:
    """Rank 0's trainer: a method call is broadcast, then run here; attributes read through."""

    def __init__(self, trainer):
        self._trainer = trainer

    def __getattr__(self, name):
        value = getattr(self._trainer, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            dist.broadcast_object_list([(name, args, kwargs)], src=0)
            return value(*args, **kwargs)

        return call


def follow(trainer):
    """The other ranks: make every call rank 0 broadcasts, until it says stop."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        name, args, kwargs = box[0]
        if name == "__stop__":
            return
        try:
            getattr(trainer, name)(*args, **kwargs)
        except ValueError:
            # Rank 0 meets the same error on the same inputs and reports it.
            pass
