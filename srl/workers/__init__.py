"""Worker kinds, by the name the controller and schedulers use."""
from srl.workers.actor import ActorWorker
from srl.workers.policy import PolicyWorker
from srl.workers.trainer import TrainerWorker

WORKERS = {"actor": ActorWorker, "policy": PolicyWorker, "trainer": TrainerWorker}

__all__ = ["WORKERS", "ActorWorker", "PolicyWorker", "TrainerWorker"]
