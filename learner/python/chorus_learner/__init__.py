"""chorus-learner: Chorus' `Learner` gRPC service on PyTorch and HF transformers.

Chorus' orchestrator and rollout workers (its own, or vLLM) talk to it exactly as to Chorus'
candle learner: scored groups in, checksummed policy versions and step reports out. The losses
are Chorus' (`objective.evaluate`, tested against `chorus loss`).
"""

from .objective import Objective, evaluate
from .trainer import RlSequence, SftSequence, Trainer, load_model

__all__ = ["Objective", "evaluate", "RlSequence", "SftSequence", "Trainer", "load_model"]
