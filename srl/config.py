"""Typed experiment schema: YAML in, validated dataclasses out.

Every problem with an experiment file becomes a :class:`ConfigError` naming the file and the
dotted field, so the CLI can print one line and exit with status 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from srl.errors import ConfigError


# --------------------------------------------------------------------------- schema


@dataclass
class EnvConfig:
    id: str = "CartPole-v1"
    """A gymnasium id (any registered one) or an srl env such as ``srl/Null-v0``."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments passed to the environment constructor."""
    vectorize: str = "auto"
    """``auto`` uses the env's own vectorized implementation when it has one, else ``sync``;
    ``ale`` (automatic for ``ALE/`` ids, ``pip install 'srl[atari]'``) steps Atari games in ale-py's
    C++ threads with the standard preprocessing, and ``kwargs`` are its arguments
    (:mod:`srl.envs.atari`)."""

    def validate(self) -> None:
        from srl.envs.vector import check_env_id
        from srl.registry import names

        if self.id in names("task"):
            return  # a token task (language-model policies), built with env.kwargs
        if self.vectorize not in ("auto", "sync", "vector_entry_point", "ale"):
            raise ConfigError("env.vectorize", f"must be auto, sync, vector_entry_point or ale, got {self.vectorize!r}")
        check_env_id(self.id)
        from srl.envs.atari import check_kwargs, is_ale_id

        if self.vectorize == "ale" and not is_ale_id(self.id):
            raise ConfigError("env.vectorize", f"ale needs an ALE/... id (such as ALE/Pong-v5), got {self.id!r}")
        if is_ale_id(self.id) and self.vectorize in ("auto", "ale"):
            check_kwargs(self.kwargs)


@dataclass
class PolicyConfig:
    type: str = "mlp"
    """Registered policy type (``mlp``)."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the actor and critic trunks."""
    activation: str = "tanh"
    """``tanh`` or ``relu``."""
    obs_norm: bool = False
    """Normalize observations with running mean / std kept by the trainer."""
    init_log_std: float = 0.0
    """Initial log standard deviation of a Gaussian head (continuous actions)."""
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """``cnn``: output channels of the Nature CNN's three convolutions (8x8 stride 4, 4x4 stride 2,
    3x3 stride 1); ``hidden`` then sizes the dense layers after them (``[512]`` in the paper)."""
    channels_last: bool = False
    """``cnn``: convolutions in channels-last memory format. Used on CUDA only (ignored on CPU)."""
    autocast: str = "none"
    """``bf16`` on CUDA: ``cnn`` runs the trunk under bfloat16 autocast (heads and losses stay
    float32); ``lm`` runs the learner's forward passes under bfloat16 autocast (float32 master
    weights, log-probabilities and losses) and generation workers sample from a bfloat16 copy of
    the policy and the draft. ``none`` keeps float32. Ignored on CPU."""
    lm: dict = field(default_factory=dict)
    """``type: lm`` (token tasks): :class:`srl.policies.lm.LMConfig` fields (``d_model``,
    ``n_layers``, ``n_heads``, ``max_seq_len``, ...); ``vocab_size`` comes from the task."""
    d_model: int = 64
    """Memory policies (``transformer``, ``gru``): width of the encoded observation and state."""
    layers: int = 2
    """``transformer``: number of memory blocks."""
    heads: int = 4
    """``transformer``: attention heads (``d_model`` must divide by it, into even head widths)."""
    memory: int = 64
    """``transformer``: steps of the episode each block remembers (the memory window M)."""
    attention: str = "srl"
    """``transformer`` on CUDA: ``srl`` runs attention on srl's FlashAttention kernels (decode in
    inference, per-row key starts in training); ``sdpa`` on torch's scaled_dot_product_attention
    (for comparison). CPU always runs torch."""

    def validate(self) -> None:
        from srl.registry import check_name

        check_name("policy.type", self.type, "policy")
        for name in ("d_model", "layers", "heads", "memory"):
            if getattr(self, name) < 1:
                raise ConfigError(f"policy.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.attention not in ("srl", "sdpa"):
            raise ConfigError("policy.attention", f"must be srl or sdpa, got {self.attention!r}")
        if self.type == "transformer" and (self.d_model % self.heads or (self.d_model // self.heads) % 2):
            raise ConfigError("policy.heads", f"d_model {self.d_model} must split into {self.heads} heads of even width")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError("policy.hidden", f"must be a non-empty list of positive widths, got {self.hidden}")
        if self.activation not in ("tanh", "relu"):
            raise ConfigError("policy.activation", f"must be tanh or relu, got {self.activation!r}")
        if len(self.channels) != 3 or any(not 1 <= c <= 4096 for c in self.channels):
            raise ConfigError("policy.channels", f"must be three channel counts in [1, 4096], got {self.channels}")
        if self.autocast not in ("none", "bf16"):
            raise ConfigError("policy.autocast", f"must be none or bf16, got {self.autocast!r}")
        if self.type == "cnn" and self.obs_norm:
            raise ConfigError("policy.obs_norm", "cnn scales uint8 pixels by 1/255 itself; set obs_norm: false")


@dataclass
class AlgorithmConfig:
    type: str = "ppo"
    """Registered learner (``ppo``, or a name given to ``srl.registry.register_learner``)."""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    """PPO's ratio clip epsilon."""
    value_clip: Optional[float] = None
    """Clip the value update around the behaviour value (None: off)."""
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    epochs: int = 4
    minibatches: int = 4
    batch_size: int = 2048
    """Env steps per training batch, counted as T x B slots of the trajectories gathered."""
    norm_adv: bool = True
    cuda_graph: bool = True
    """``ppo`` / ``appo`` with a feed-forward policy, Adam or AdamW, on one CUDA trainer: replay
    each minibatch step from a CUDA graph (srl.algorithms.graphed_step); ``false`` steps eagerly."""
    norm_returns: bool = False
    """Divide rewards by a running std of discounted returns (helps MuJoCo-scale rewards)."""
    max_policy_lag: int = 4
    """Trajectories produced by a policy more than this many versions old are dropped."""
    rho_bar: float = 1.0
    """``appo``: V-trace's clip of the importance ratio in the temporal differences (rho-bar)."""
    c_bar: float = 1.0
    """``appo``: V-trace's clip of the importance ratio in the trace (c-bar, at most ``rho_bar``)."""
    group_size: int = 8
    """GRPO: completions per prompt (G); advantages are normalized within each group."""
    kl_coef: float = 0.0
    """GRPO: weight of the KL penalty to the frozen initial policy (0: no reference model)."""
    warmup_steps: int = 0
    """GRPO: supervised steps on the task's solved problems (``task.stream``) before RL, so that
    exact-match rewards are not all zero at the start; the reference policy is the warmed-up one."""
    warmup_lr: float = 1.0e-3
    """GRPO: AdamW learning rate of the warm-up."""
    warmup_batch: int = 64
    """GRPO: sequences (of up to 64 tokens) per warm-up step."""
    warmup_target: float | None = None
    """GRPO: stop the warm-up at the first check (every ``WARMUP_CHECK_EVERY`` steps) where greedy
    exact match on held-out prompts reaches this; ``warmup_steps`` is then the cap. None: run all
    ``warmup_steps``."""
    warmup_cache: str = ""
    """GRPO: a folder where warmed-up weights are kept, keyed by model, task, steps, lr, batch, seed
    and target; a later warm-up with the same key loads them instead of training ("": none)."""

    def validate(self) -> None:
        from srl.registry import check_name

        check_name("algorithm.type", self.type, "learner")
        _in_range("algorithm.gamma", self.gamma, 0.0, 1.0)
        _in_range("algorithm.gae_lambda", self.gae_lambda, 0.0, 1.0)
        _in_range("algorithm.clip", self.clip, 0.0, 10.0, low_open=True)
        _in_range("algorithm.ent_coef", self.ent_coef, 0.0, 100.0)
        _in_range("algorithm.vf_coef", self.vf_coef, 0.0, 100.0)
        _in_range("algorithm.max_grad_norm", self.max_grad_norm, 0.0, 1e9, low_open=True)
        _at_least("algorithm.epochs", self.epochs, 1)
        _at_least("algorithm.minibatches", self.minibatches, 1)
        _at_least("algorithm.batch_size", self.batch_size, 1)
        _at_least("algorithm.max_policy_lag", self.max_policy_lag, 0)
        _at_least("algorithm.group_size", self.group_size, 1)
        _in_range("algorithm.kl_coef", self.kl_coef, 0.0, 100.0)
        _at_least("algorithm.warmup_steps", self.warmup_steps, 0)
        _in_range("algorithm.warmup_lr", self.warmup_lr, 0.0, 10.0, low_open=True)
        _at_least("algorithm.warmup_batch", self.warmup_batch, 1)
        if self.warmup_target is not None:
            _in_range("algorithm.warmup_target", self.warmup_target, 0.0, 1.0, low_open=True)
        if self.value_clip is not None:
            _in_range("algorithm.value_clip", self.value_clip, 0.0, 1e9, low_open=True)
        _in_range("algorithm.rho_bar", self.rho_bar, 0.0, 1e6, low_open=True)
        _in_range("algorithm.c_bar", self.c_bar, 0.0, self.rho_bar, low_open=True)


@dataclass
class OptimizerConfig:
    type: str = "adam"
    """``adam``, ``adamw``, ``sgd`` or ``sophia``."""
    lr: float = 3e-4
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over ``stop.env_steps``."""
    kwargs: dict = field(default_factory=dict)
    """Extra optimizer arguments (``betas``, ``rho``, ``weight_decay``, ``update_period`` ...)."""

    def validate(self) -> None:
        from srl.registry import check_name

        check_name("optimizer.type", self.type, "optimizer")
        _in_range("optimizer.lr", self.lr, 0.0, 10.0, low_open=True)


@dataclass
class ActorsConfig:
    count: int = 1
    envs_per_actor: int = 16
    ring: int = 1
    """Env groups per actor: while one group waits for actions the next one steps (remote policy only)."""
    rollout_len: int = 32
    """T: steps per trajectory sent to the trainer."""
    inline_policy: bool = True
    """Run the policy inside the actor process (tiny CPU policies) instead of on a policy worker."""
    max_ahead: int = 1
    """Trajectories an actor may have in flight beyond its share of the next batch before it waits
    for the trainer's next version. Bounds the policy lag; 0 makes collection and learning
    alternate."""
    nice: int = 0
    """CPU priority of the actor processes (0-19, as ``nice`` sets it): above 0, policy workers
    and trainers sharing the machine get the cores first when envs keep every core busy."""
    num_cpus: float = 1.0
    """Ray: CPUs each actor worker reserves (placement only; Ray does not pin cores)."""
    resources: dict = field(default_factory=dict)
    """Ray: custom resources each actor worker reserves, e.g. ``{cpu_node: 1}`` to keep actors on
    nodes started with ``--resources '{"cpu_node": 64}'``."""

    def validate(self) -> None:
        _at_least("workers.actors.count", self.count, 1)
        _check_ray_request("workers.actors", self.num_cpus, 0.0, self.resources)
        _at_least("workers.actors.max_ahead", self.max_ahead, 0)
        _at_least("workers.actors.envs_per_actor", self.envs_per_actor, 1)
        _at_least("workers.actors.ring", self.ring, 1)
        _in_range("workers.actors.nice", self.nice, 0, 19)
        _at_least("workers.actors.rollout_len", self.rollout_len, 1)
        if self.envs_per_actor % self.ring:
            raise ConfigError(
                "workers.actors.ring",
                f"must divide workers.actors.envs_per_actor ({self.envs_per_actor}), got {self.ring}",
            )


@dataclass
class PoliciesConfig:
    count: int = 1
    """Policy workers (used when actors do not run the policy inline)."""
    device: str = "cpu"
    max_batch: int = 4096
    """Upper bound on observations in one forward pass."""
    cuda_graph: bool = True
    """Memory policies, and policies over frame stacks kept by the policy worker, on CUDA: replay
    the inference step from CUDA graphs (one per batch-size bucket; see :mod:`srl.policies.graphed`);
    ``false`` runs every step eagerly."""
    routing: str = "sticky"
    """``sticky``: every request of one env reaches the same policy worker for the whole run
    (per-env state such as a memory can live there); ``round_robin``: any policy worker answers."""
    num_cpus: float = 1.0
    """Ray: CPUs each policy worker reserves."""
    num_gpus: float = 0.0
    """Ray: GPUs each policy worker reserves; fractions share one GPU (0.25: four per GPU).
    Needs ``device: cuda`` to be used."""
    resources: dict = field(default_factory=dict)
    """Ray: custom resources each policy worker reserves, e.g. ``{gpu_node: 1}``."""

    def validate(self) -> None:
        _at_least("workers.policies.count", self.count, 0)
        _check_ray_request("workers.policies", self.num_cpus, self.num_gpus, self.resources)
        _at_least("workers.policies.max_batch", self.max_batch, 1)
        _check_device("workers.policies.device", self.device)
        if self.routing not in ("sticky", "round_robin"):
            raise ConfigError("workers.policies.routing", f"must be sticky or round_robin, got {self.routing!r}")


@dataclass
class TrainersConfig:
    count: int = 1
    """Data-parallel trainer processes of the one policy: each consumes the trajectories of its
    share of the actors, gradients are all-reduced (torch.distributed), rank 0 checkpoints."""
    device: str = "cpu"
    backend: str = "auto"
    """torch.distributed backend of the trainer group: ``auto`` (NCCL on GPUs, gloo on CPU),
    ``gloo`` or ``nccl``."""
    torch_threads: int = 1
    """Intra-op threads for the trainer's torch."""
    num_cpus: float = 1.0
    """Ray: CPUs the trainer reserves."""
    num_gpus: float = 0.0
    """Ray: GPUs the trainer reserves: 1 for a GPU of its own, a fraction to share one with
    policy workers. Needs ``device: cuda`` to be used."""
    resources: dict = field(default_factory=dict)
    """Ray: custom resources the trainer reserves, e.g. ``{gpu_node: 1}``."""

    def validate(self) -> None:
        _check_ray_request("workers.trainers", self.num_cpus, self.num_gpus, self.resources)
        _at_least("workers.trainers.count", self.count, 1)
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError("workers.trainers.backend", f"must be auto, gloo or nccl, got {self.backend!r}")
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("workers.trainers.backend", "nccl needs workers.trainers.device: cuda")
        _check_device("workers.trainers.device", self.device)
        _at_least("workers.trainers.torch_threads", self.torch_threads, 1)


@dataclass
class WorkersConfig:
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    trainers: TrainersConfig = field(default_factory=TrainersConfig)
    sync: bool = False
    """Strictly on-policy: each actor waits for the weights trained on its last trajectory.
    Slower, but a seeded run is reproducible step for step."""
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 30.0
    """A worker silent for this long is treated as dead and restarted."""
    max_restarts: int = 10
    """Restarts of dead or silent workers the controller may make in one run (all workers
    together, local and Ray alike); one more failure ends the run with an error."""
    start_method: str = "fork"
    """How the local scheduler starts worker processes: ``fork`` (fast) or ``spawn``."""

    def validate(self) -> None:
        self.actors.validate()
        self.policies.validate()
        self.trainers.validate()
        if not self.actors.inline_policy and self.policies.count < 1:
            raise ConfigError("workers.policies.count", "must be >= 1 when workers.actors.inline_policy is false")
        if self.sync and not self.actors.inline_policy:
            raise ConfigError("workers.sync", "needs workers.actors.inline_policy: true (policy workers serve many versions)")
        _in_range("workers.heartbeat_s", self.heartbeat_s, 0.0, 60.0, low_open=True)
        _in_range("workers.heartbeat_timeout_s", self.heartbeat_timeout_s, self.heartbeat_s, 3600.0)
        _at_least("workers.max_restarts", self.max_restarts, 0)
        if self.start_method not in ("fork", "spawn", "forkserver"):
            raise ConfigError("workers.start_method", f"must be fork, spawn or forkserver, got {self.start_method!r}")


@dataclass
class StopConfig:
    env_steps: Optional[int] = None
    mean_return: Optional[float] = None
    """Stop once the mean return over the last ``window`` finished episodes reaches this."""
    wall_s: Optional[float] = None
    window: Optional[int] = None
    """Episodes the mean return averages (default 20; token tasks: one batch of completions).
    Success-or-failure tasks need more than 20 for a mean that is not mostly noise."""

    def validate(self) -> None:
        if self.env_steps is not None:
            _at_least("stop.env_steps", self.env_steps, 1)
        if self.window is not None:
            _in_range("stop.window", self.window, 1, 1_000_000)
        if self.wall_s is not None:
            _in_range("stop.wall_s", self.wall_s, 0.0, 1e9, low_open=True)
        if self.env_steps is None and self.wall_s is None and self.mean_return is None:
            raise ConfigError("stop", "needs at least one of env_steps, mean_return, wall_s")


@dataclass
class LogConfig:
    dir: str = "runs"
    """Parent folder of run directories."""
    tensorboard: bool = True
    every_s: float = 1.0
    """Seconds between metric rows."""
    console: bool = True

    def validate(self) -> None:
        _in_range("log.every_s", self.every_s, 0.0, 3600.0, low_open=True)


@dataclass
class CheckpointConfig:
    every_seconds: float = 10.0
    """Seconds between checkpoints; the first one is written right after the first update, so a
    trainer that dies early loses at most this much learning."""
    keep: int = 3

    def validate(self) -> None:
        _in_range("checkpoint.every_seconds", self.every_seconds, 0.0, 1e9, low_open=True)
        _at_least("checkpoint.keep", self.keep, 1)


@dataclass
class NetworkConfig:
    host: str = "127.0.0.1"
    """Address sockets bind to; loopback unless you mean it. Ray runs ignore it: each worker
    binds to its node's address as Ray knows it, and the controller to the driver's."""
    hmac: bool = True
    """Sign every frame of every stream with a per-run secret, drawn at launch and handed to the
    workers in memory (never in files or logs). Off only when set to false here, and then a
    warning says so; Ray runs sign whatever this says."""
    shared_weights: bool = True
    """Parameter clients on the trainer's host (policy, generation and draft workers, inline
    actors) copy new weights from a shared-memory file only this user can open; the signed stream
    carries its name and layout. Off: every copy goes through the stream, encoded and signed."""


@dataclass
class ClusterConfig:
    backend: str = "local"
    """``local`` (processes on this host) or ``ray``."""
    address: Optional[str] = None
    """Ray address: ``auto`` joins the cluster this machine belongs to (``RAY_ADDRESS``, which a
    ``ray job`` sets, or the one ``ray start`` began here), ``HOST:6379`` or ``ray://HOST:10001`` a
    given one; null does what ``auto`` does but starts a one-machine Ray when there is none."""
    spread: bool = True
    """Ray: place actor and policy workers with the SPREAD strategy, across nodes. False packs
    them with Ray's default policy. The trainer always uses the default policy."""

    def validate(self) -> None:
        if self.backend not in ("local", "ray"):
            raise ConfigError("cluster.backend", f"must be local or ray, got {self.backend!r}")
        if self.address is not None and not self.address.strip():
            raise ConfigError("cluster.address", "must be null, auto or a Ray address, got an empty string")


@dataclass
class GenerationConfig:
    """How generation workers turn prompts into completions (token tasks only)."""

    mode: str = "plain"
    """``plain`` (autoregressive), ``standard`` (speculative, one draft) or ``spectr`` (SpecTr
    K-SEQ, ``k`` drafts). Completions are distributed exactly as the policy's in every mode, and
    the sample stream carries the policy's log-probabilities. ``auto`` picks one of them (with
    its k and draft_len) per batch size from a table measured on the device
    (``srl.generation.auto``, ``auto_table``) and logs the choice."""
    auto_table: Optional[str] = None
    """``auto``: JSON file of the measured table (``benchmarks/generation.py --auto``); null uses
    the built-in H200 table."""
    k: int = 4
    """``spectr``: draft sequences per step."""
    draft_len: int = 4
    """Speculative modes: tokens each draft proposes per step."""
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    max_new_tokens: int = 0
    """Tokens generated per completion; 0 takes the task's ``answer_len`` (answer plus eos)."""
    cuda_graph: bool = True
    """Capture decode steps in CUDA graphs (GPU generation workers)."""

    def validate(self) -> None:
        if self.mode not in ("plain", "standard", "spectr", "auto"):
            raise ConfigError("generation.mode", f"must be plain, standard, spectr or auto, got {self.mode!r}")
        if self.auto_table is not None:
            from srl.generation.auto import load_table
            try:
                load_table(self.auto_table)
            except (OSError, ValueError) as e:
                raise ConfigError("generation.auto_table", f"cannot be read: {e}") from None
        _at_least("generation.k", self.k, 1)
        _at_least("generation.draft_len", self.draft_len, 1)
        _in_range("generation.temperature", self.temperature, 0.0, 100.0)
        if self.top_k is not None:
            _at_least("generation.top_k", self.top_k, 1)
        if self.top_p is not None:
            _in_range("generation.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _at_least("generation.max_new_tokens", self.max_new_tokens, 0)


@dataclass
class DraftConfig:
    """The draft model of speculative generation and the draft worker that keeps it aligned."""

    lm: dict = field(default_factory=lambda: {"d_model": 64, "n_layers": 1, "n_heads": 2})
    """:class:`srl.policies.lm.LMConfig` fields of the draft (``vocab_size`` from the task)."""
    align: bool = True
    """Run a draft worker: it distils the policy into the draft on every sequence of the sample
    stream once and publishes the draft's weights to the generation workers. False keeps the
    draft at its initial weights."""
    align_updates: int | None = None
    """The draft worker stops distilling after this many updates (None: never) and goes on measuring
    acceptance on every sample message: the ablation of a draft that stops following the policy."""
    lr: float = 1.0e-3
    loss: str = "kl"
    """``kl``: KL(policy || draft) per position; ``tv``: total variation (1 - acceptance). On the
    H200 rlhf_addition run TV let acceptance fall from 0.40 to 0.15; KL stayed at 0.37-0.45 (round I)."""
    warmup_steps: int | None = None
    """Supervised warm-up steps of the draft on the task (None: ``algorithm.warmup_steps``). A
    small draft needs more than the policy's, which stops at a modest accuracy on purpose."""
    warmup_lr: float | None = None
    """The draft's warm-up learning rate (None: ``algorithm.warmup_lr``)."""
    device: str = "cpu"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict = field(default_factory=dict)

    def validate(self) -> None:
        _in_range("draft.lr", self.lr, 0.0, 10.0, low_open=True)
        if self.align_updates is not None:
            _at_least("draft.align_updates", self.align_updates, 0)
        if self.warmup_steps is not None:
            _at_least("draft.warmup_steps", self.warmup_steps, 0)
        if self.warmup_lr is not None:
            _in_range("draft.warmup_lr", self.warmup_lr, 0.0, 10.0, low_open=True)
        if self.loss not in ("kl", "tv"):
            raise ConfigError("draft.loss", f"must be kl or tv, got {self.loss!r}")
        _check_device("draft.device", self.device)
        _check_ray_request("draft", self.num_cpus, self.num_gpus, self.resources)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    """Run name; run directories are ``log.dir/name-DATE-TIME``."""
    seed: int = 1
    """Seeds envs (offset per actor), torch and minibatch shuffling."""
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Token tasks: how completions are generated."""
    draft: DraftConfig = field(default_factory=DraftConfig)
    """Token tasks with speculative generation: the draft model and its worker."""

    def validate(self) -> "ExperimentConfig":
        if not self.name or any(c in self.name for c in "/\\"):
            raise ConfigError("name", f"must be a non-empty name without slashes, got {self.name!r}")
        _at_least("seed", self.seed, 0)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate()
        _check_sizes(self)
        _check_token_run(self)
        _check_memory_routing(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- checks


def _check_memory_routing(cfg: "ExperimentConfig") -> None:
    """A memory policy keeps per-env state where inference runs: each env must reach one worker."""
    from srl.registry import resolve

    p = cfg.workers.policies
    remote = not cfg.workers.actors.inline_policy and p.count > 1
    if remote and p.routing != "sticky" and getattr(resolve("policy", cfg.policy.type), "recurrent", False):
        raise ConfigError("workers.policies.routing", f"policy {cfg.policy.type!r} keeps per-env memory on its "
                                                      f"policy worker: use sticky, got {p.routing!r}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(name, f"must be >= {low}, got {value}")


def _in_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    bad = value <= low if low_open else value < low
    if bad or value > high:
        lo = "(" if low_open else "["
        raise ConfigError(name, f"must be in {lo}{low}, {high}], got {value}")


def _check_ray_request(section: str, num_cpus: float, num_gpus: float, resources: dict) -> None:
    """Resource requests of one worker role, checked the way Ray would refuse them."""
    _in_range(f"{section}.num_cpus", num_cpus, 0.0, 1024.0)
    _in_range(f"{section}.num_gpus", num_gpus, 0.0, 64.0)
    if num_gpus > 1 and not float(num_gpus).is_integer():
        raise ConfigError(f"{section}.num_gpus", f"must be a whole number above 1 (Ray's rule), got {num_gpus}")
    for name, amount in resources.items():
        path = f"{section}.resources.{name}"
        if not isinstance(name, str) or not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(path, "must be a custom resource name (CPU and GPU have their own fields)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ConfigError(path, f"must be a positive number, got {amount!r}")


def _check_token_run(cfg: "ExperimentConfig") -> None:
    """Cross-field rules of a token task run (``env.id`` names a task): an LM policy, a token
    learner, generation workers, and model options that build."""
    from srl.registry import names

    token = cfg.env.id in names("task")
    if not token:
        if cfg.policy.type == "lm" or cfg.algorithm.type == "grpo":
            raise ConfigError("env.id", f"policy.type lm and algorithm.type grpo need a token task "
                                        f"({', '.join(names('task'))}), got {cfg.env.id!r}")
        return
    if cfg.policy.type != "lm":
        raise ConfigError("policy.type", f"must be lm for the token task {cfg.env.id}, got {cfg.policy.type!r}")
    if cfg.algorithm.type in ("appo", "token_ppo"):
        raise ConfigError("algorithm.type", f"token tasks train with grpo or ppo, got {cfg.algorithm.type!r}")
    if cfg.algorithm.type == "ppo" and not cfg.policy.lm.get("value_head"):
        raise ConfigError("policy.lm.value_head", "must be true for algorithm.type ppo on a token task (the critic)")
    if cfg.workers.policies.count < 1:
        raise ConfigError("workers.policies.count", "must be >= 1: token tasks generate on policy workers")
    if cfg.workers.sync:
        raise ConfigError("workers.sync", "is not supported for token tasks")
    if cfg.generation.temperature <= 0:
        raise ConfigError("generation.temperature", "must be > 0 for RL (a greedy policy has no log-probabilities)")
    for section, lm in (("policy.lm", cfg.policy.lm), ("draft.lm", cfg.draft.lm)):
        _check_lm(section, lm)


def _check_lm(section: str, lm: dict) -> None:
    from srl.policies.lm import LMConfig

    known = {f.name for f in dataclasses.fields(LMConfig)} - {"vocab_size"}
    for key in lm:
        if key not in known:
            raise ConfigError(f"{section}.{key}", _unknown_key_message(str(key), sorted(known)))
    try:
        c = LMConfig(vocab_size=1, **_deep_copy(lm)).validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(section, str(exc))
    weights = 4 * c.n_layers * c.d_model * c.d_model * (4 + 2 * c.mlp_ratio)  # float32 blocks
    if weights > MAX_WEIGHT_BYTES or c.max_seq_len > 1 << 20:
        raise ConfigError(section, f"a model of {_bytes(weights)} (at most {_bytes(MAX_WEIGHT_BYTES)}) or "
                                   f"max_seq_len {c.max_seq_len} (at most {1 << 20}) is refused")


def _check_device(name: str, device: str) -> None:
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(name, f"must be cpu, cuda or cuda:N, got {device!r}")


# --------------------------------------------------------------------------- size bounds

MIN_STEP_BYTES = 24
"""Fewest bytes one env step can take in a trajectory (a one-float observation plus action, reward,
log-probability, value and flags). Memory estimates in the bound messages use it, so a real
environment needs more."""
MAX_TRAJECTORY_BYTES = 16 << 30
"""Largest trajectory buffer one actor may need at MIN_STEP_BYTES a step."""
MAX_WEIGHT_BYTES = 8 << 30
"""Largest float32 weight count of the policy's hidden layers (actor and critic trunks)."""

SIZE_LIMITS = {
    "seed": 2**32 - 1,
    "workers.actors.count": 4096,
    "workers.actors.envs_per_actor": 1 << 16,
    "workers.actors.ring": 1024,
    "workers.actors.rollout_len": 1 << 16,
    "workers.actors.max_ahead": 1024,
    "workers.policies.count": 1024,
    "workers.policies.max_batch": 1 << 20,
    "workers.trainers.count": 1024,
    "workers.trainers.torch_threads": 1024,
    "workers.max_restarts": 1_000_000,
    "algorithm.batch_size": 1 << 26,
    "algorithm.epochs": 10_000,
    "algorithm.minibatches": 1 << 20,
    "algorithm.max_policy_lag": 1 << 20,
    "policy.hidden": 1 << 16,
    "policy.d_model": 1 << 14,
    "policy.layers": 256,
    "policy.heads": 1024,
    "policy.memory": 1 << 16,
    "checkpoint.keep": 1000,
    "stop.env_steps": 2**62,
}
"""Upper bound of every size field, checked at load so that a typo cannot make a worker try to
allocate terabytes. ``policy.hidden`` bounds each width."""
MAX_HIDDEN_LAYERS = 64


def _check_sizes(cfg: "ExperimentConfig") -> None:
    """Upper bounds of the size fields, with the memory a too-large value would need."""
    a = cfg.workers.actors
    traj = a.envs_per_actor * (a.rollout_len + 1) * MIN_STEP_BYTES
    needs = {
        "workers.actors.envs_per_actor": f"an actor would need at least {_bytes(traj)} for its trajectories: "
                                         f"envs_per_actor x (rollout_len + 1) x {MIN_STEP_BYTES} B",
        "workers.actors.rollout_len": f"an actor would need at least {_bytes(traj)} for its trajectories",
        "workers.policies.max_batch": "a forward pass would need at least "
                                      f"{_bytes(cfg.workers.policies.max_batch * MIN_STEP_BYTES)} of inputs and outputs",
        "algorithm.batch_size": "the trainer would hold at least "
                                f"{_bytes(cfg.algorithm.batch_size * MIN_STEP_BYTES)} of trajectories per batch",
        "workers.actors.count": "one process each",
        "workers.policies.count": "one process each",
        "workers.trainers.count": "one process each",
    }
    for name, limit in SIZE_LIMITS.items():
        value = _get(cfg, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v > limit:
                need = needs.get(name)
                raise ConfigError(name, f"must be <= {limit}, got {value}" + (f" ({need})" if need else ""))
    if len(cfg.policy.hidden) > MAX_HIDDEN_LAYERS:
        raise ConfigError("policy.hidden", f"must have at most {MAX_HIDDEN_LAYERS} layers, got {len(cfg.policy.hidden)}")
    weights = 2 * 4 * sum(x * y for x, y in zip(cfg.policy.hidden, cfg.policy.hidden[1:]))  # two trunks, float32
    if weights > MAX_WEIGHT_BYTES:
        raise ConfigError("policy.hidden", f"{cfg.policy.hidden} would need {_bytes(weights)} for the hidden "
                                           f"weights alone, at most {_bytes(MAX_WEIGHT_BYTES)}")
    if traj > MAX_TRAJECTORY_BYTES:
        raise ConfigError("workers.actors.envs_per_actor",
                          f"{a.envs_per_actor} envs x rollout_len {a.rollout_len} would need at least {_bytes(traj)} "
                          f"of trajectories per actor, at most {_bytes(MAX_TRAJECTORY_BYTES)}")
    _check_finite(cfg, "")


def _check_finite(node: Any, path: str) -> None:
    """No nan or inf in any float field (YAML reads .nan and .inf; range checks let nan through)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        name = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value}")


def _get(cfg: "ExperimentConfig", dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # unreachable


# --------------------------------------------------------------------------- loading


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that also refuses aliases, so a file cannot expand into an alias bomb."""

    def compose_node(self, parent, index):  # noqa: D401 - yaml hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed in experiment files")
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise ConfigError("", f"not allowed: {tag.strip()} (YAML tags that build Python objects are refused)", source)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {' '.join(str(exc).split())}", source)


def load_experiment(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment YAML file, apply ``a.b=value`` overrides, and validate it."""
    source = os.fspath(path)
    if not os.path.exists(source):
        raise ConfigError("", "file not found", source)
    if os.path.isdir(source):
        raise ConfigError("", "is a directory, expected a YAML file", source)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read: {exc}", source)
    data = parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", f"must hold a mapping of experiment fields, got {type(data).__name__}", source)
    return experiment_from_dict(data, overrides or [], source)


def experiment_from_dict(data: dict, overrides: list[str] | tuple = (), source: str = "<dict>") -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from plain data plus overrides."""
    data = _deep_copy(data)
    for item in overrides:
        apply_override(data, item)
    try:
        cfg = from_dict(ExperimentConfig, data, "")
        return cfg.validate()
    except ConfigError as exc:
        raise exc.with_source(source)


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError("", f"override {item!r} must look like key=value", "override")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    _resolve_field(ExperimentConfig, parts, key)
    value = parse_yaml(raw, f"override {key}")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _resolve_field(cls: type, parts: list[str], key: str) -> None:
    """Check an override path against the schema, with a did-you-mean for typos."""
    current: Any = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(current):
            if typing.get_origin(current) is dict or current is dict:
                return  # free-form mapping such as env.kwargs
            raise ConfigError(".".join(parts[:i]), f"is not a section, cannot set {key!r}", "override")
        hints = typing.get_type_hints(current)
        if part not in hints:
            raise ConfigError(".".join(parts[: i + 1]), _unknown_key_message(part, list(hints)), "override")
        current = _strip_optional(hints[part])


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Convert plain YAML data into dataclass ``cls``, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"must be a mapping, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(name, _unknown_key_message(str(key), list(hints)))
        kwargs[key] = _convert(hints[key], value, name)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if _is_optional(tp):
        if value is None:
            return None
        tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {_type_name(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"must be an integer, got {_type_name(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {_type_name(value)} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_type_name(value)} {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {_type_name(value)} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {_type_name(value)}")
        return dict(value)
    return value


def _unknown_key_message(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(sorted(choices))}"
    return f"unknown key{hint}"


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
