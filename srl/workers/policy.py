"""Policy worker: answers inference requests from many actors with one forward pass each time."""
from __future__ import annotations

import numpy as np
import torch

from srl.envs.vector import SpaceInfo
from srl.policies.mlp import build_policy, load_numpy_weights
from srl.streams.inference import InferenceServer
from srl.streams.params import ParamClient
from srl.system.name_resolve import wait_for
from srl.system.worker import PollResult, Worker


class PolicyWorker(Worker):
    kind = "policy"

    def _configure(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 31 + self.spec.index)
        torch.set_num_threads(1)
        self.device = cfg.workers.policies.device
        self.policy = build_policy(SpaceInfo.from_dict(self.spec.space), cfg.policy).to(self.device)
        self.params = self.endpoint(ParamClient(wait_for(self.resolver, "trainer/0/params", should_stop=self.should_stop), self.key))
        got = self.params.wait_newer(-1, timeout_s=600.0, should_stop=self.should_stop)
        self.version = -1 if got is None else self._load(got)
        key = f"policy/{self.spec.index}/inference"
        self.server = self.endpoint(InferenceServer(self.spec.host, self.key, prefer=self.resolver.get(key)))
        self.resolver.put(key, self.server.address)
        self.requests = 0
        self.batches = 0

    def _load(self, got) -> int:
        version, arrays = got
        load_numpy_weights(self.policy, arrays)
        return version

    def _collect_stats(self) -> dict:
        stats = {"requests": self.requests, "forward_passes": self.batches, "version": self.version}
        self.requests = self.batches = 0
        return stats

    def _poll(self) -> PollResult:
        got = self.params.poll()
        if got is not None:
            self.version = self._load(got)
        pending = self.server.pending(self.cfg.workers.policies.max_batch, timeout_ms=20)
        if not pending:
            return PollResult()
        sizes = [len(r.obs) for r in pending]
        obs = torch.from_numpy(np.concatenate([r.obs for r in pending])).to(self.device)
        action, logp = self.policy.act(obs)
        action, logp = action.cpu().numpy(), logp.cpu().numpy()
        start = 0
        for request, n in zip(pending, sizes):
            self.server.reply(request, {"action": action[start:start + n], "logp": logp[start:start + n]},
                              {"version": self.version})
            start += n
        self.requests += len(pending)
        self.batches += 1
        return PollResult(samples=len(pending), batches=1)
