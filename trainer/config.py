"""The trainer's configuration: one `TrainConfig` (nested sections) per training process, one `EvalConfig`
per evaluation, validated in `__post_init__`.

Sources, later ones winning: the dataclass defaults, a YAML file (sections as nested mappings, e.g.
`optim: {lr: 3e-4}`), then command-line flags. Each field that has a flag names it in its metadata
(`flag(...)`), so `add_flags` builds the parser from the dataclasses and `build_config` merges the three
sources (client/config_flags.py, shared with `draftfeed serve`); nothing else reads flags, files or the
environment for settings.

Optimiser defaults are NeMo AutoModel's recipes (docs/architecture.md sections 1-3): AdamW betas (0.9, 0.95), no
weight decay, cosine to 0.1 * lr, clip 1.0; lr 1e-4 with 5% warmup for EAGLE-3, lr 6e-4 with 4% warmup for
DFlash / DSpark (`--lr` / `--warmup-ratio` unset = the algorithm's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from draftfeed.client.channel import parse_target
from draftfeed.client.config_flags import (
    ConfigError,
    add_flags,
    build_config,
    config_from_dict,
    config_to_dict,
    flag,
)
from draftfeed.client.errors import InvalidArgument

__all__ = [
    "TargetConfig",
    "DataConfig",
    "Eagle3Config",
    "BlockConfig",
    "DSparkTrainConfig",
    "OptimConfig",
    "LoopConfig",
    "DistConfig",
    "TrainConfig",
    "EvalConfig",
    "ConfigError",
    "flag",
    "add_flags",
    "build_config",
    "config_from_dict",
    "config_to_dict",
]

PROMPT_SETS = ("mtbench", "humaneval")
EVAL_MAX_NEW_TOKENS = 256  # `draftfeed eval`'s tokens a prompt, and what validation's decoding walk covers


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def split_target_urls(text: str) -> list[str]:
    """`grpc://a:1,grpc://b:2` -> two URLs; a resolver target whose own syntax uses commas
    (`ipv4:HOST:PORT,HOST:PORT`, optionally after grpc:// or grpcs://) stays one."""
    text = text.strip()
    if text.removeprefix("grpcs://").removeprefix("grpc://").startswith(("ipv4:", "ipv6:")):
        return [text]
    return [p.strip() for p in text.split(",") if p.strip()]


@dataclass
class TargetConfig:
    """Where the target runs: a server (`url`) or in this process (`model`)."""

    url: list[str] = flag(
        "--target",
        "the draftfeed server: grpc://HOST:PORT, grpcs://HOST:PORT (TLS), or a gRPC target naming several "
        "replicas (grpc://dns:///NAME:PORT, ipv4:HOST:PORT,HOST:PORT); repeat, or comma-separate URLs, for "
        "several servers",
        default_factory=list,
        action="append",
        metavar="URL",
    )
    model: str | None = flag(
        "--target-model",
        "local HF checkpoint: the in-process target when no --target is given (default: built-in "
        "SmolLM2-135M-Instruct); with --target, optional: a local copy of the served target (its tokenizer "
        "must be the served one), used to regenerate data (default: the server's tokenizer and config)",
        None,
    )
    dtype: str = flag(
        "--target-dtype", "in-process target dtype: auto (bf16 on GPU), bfloat16, float32", "auto"
    )
    layer_ids: list[int] | None = flag(
        "--layer-ids", "target layer ids to capture (default: the algorithm's)", None
    )
    encodings: str | dict[str, str] | None = flag(
        "--encodings",
        "how a remote target's tensors travel: exact (default: bit-exact; EAGLE-3 probabilities rebuilt "
        "here from the final state), compact (exact + fp8 hidden states), raw, and/or KIND=NAME overrides "
        "(hidden=fp8,probs=latent)",
        None,
    )
    job_name: str = flag("--job-name", "label of this job on the server", "draftfeed-train")
    timeout: float = flag(None, "seconds per remote request", 120.0)
    retry_s: float = flag(
        "--target-retry-s",
        "seconds to keep retrying an unreachable server (riding out a restart) before the run fails",
        60.0,
    )
    token_file: str | None = flag(
        "--target-token-file",
        "file holding this job's token for a server started with --token-file (read once; never logged)",
        None,
    )
    ca_file: str | None = flag(
        "--target-ca-file", "PEM CA bundle that signed the server's certificate (grpcs:// URLs)", None
    )
    client_cert: str | None = flag(
        "--target-client-cert", "PEM client certificate for a server that asks for one (mutual TLS)", None
    )
    client_key: str | None = flag("--target-client-key", "PEM key of --target-client-cert", None)
    server_name: str | None = flag(
        "--target-server-name",
        "name to check the server's certificate against when it differs from the URL's host",
        None,
    )

    def __post_init__(self):
        urls = []
        for u in self.url:
            urls += split_target_urls(str(u))
        self.url = urls
        for u in self.url:
            try:
                parse_target(u)
            except InvalidArgument as err:
                raise ConfigError(f"--target: {err}") from None
        from draftfeed.client.encodings import parse_encodings

        try:
            parse_encodings(self.encodings)
        except InvalidArgument as err:
            raise ConfigError(f"--encodings {self.encodings!r}: {err}") from None
        _check(
            self.dtype == "auto" or self.dtype in _model_dtype_names(),
            f"--target-dtype {self.dtype!r}: expected auto, bfloat16, float16 or float32",
        )
        for name in ("token_file", "ca_file", "client_cert", "client_key"):
            path = getattr(self, name)
            flag_name = "--target-" + name.replace("_", "-")
            _check(path is None or Path(path).is_file(), f"{flag_name} {path!r}: no such file")
        _check(self.retry_s >= 0, f"--target-retry-s {self.retry_s}: expected seconds >= 0")
        _check(
            (self.client_cert is None) == (self.client_key is None),
            "--target-client-cert and --target-client-key go together: give both for mutual TLS, or neither",
        )
        tls = any(u.startswith("grpcs://") for u in self.url)
        _check(
            tls or not (self.ca_file or self.client_cert or self.server_name),
            "--target-ca-file / --target-client-cert / --target-server-name are for TLS: use grpcs:// URLs",
        )

    def client_kwargs(self) -> dict:
        """Connection keywords for `Remote*TargetModel.from_urls`: job name, timeout, TLS files, token."""
        token = None
        if self.token_file is not None:
            token = Path(self.token_file).read_text().strip()
            _check(
                bool(token), f"--target-token-file {self.token_file!r} is empty; put the job's token in it"
            )
        return {
            "job_name": self.job_name,
            "encodings": self.encodings,
            "timeout": self.timeout,
            "retry_budget": self.retry_s,
            "token": token,
            "ca_file": self.ca_file,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
            "server_name": self.server_name,
        }

    @property
    def remote(self) -> bool:
        return bool(self.url)


@dataclass
class DataConfig:
    """Training conversations and how they become token batches (trainer/data.py)."""

    path: str | None = flag(
        "--data", "chat JSON/JSONL file (ShareGPT or OpenAI records); default: the packaged ShareGPT", None
    )
    limit: int | None = flag("--data-limit", "use at most this many conversations", None)
    holdout: int = flag(
        "--data-holdout",
        "hold out the last N usable conversations read (never trained on, never regenerated); their first "
        "user turns are written to OUT/heldout_prompts.jsonl for `draftfeed eval --prompts`",
        0,
    )
    seq_len: int = flag("--seq-len", "tokens per row", 1024)
    batch_size: int = flag("--batch-size", "rows per micro-batch per rank", 1)
    pack: bool = flag("--pack", "pack conversations end to end (position_ids / seq_lens)", False)
    regenerate: bool = flag(
        "--regenerate", "regenerate the assistant turns with the target itself before training", False
    )
    regen_max_new_tokens: int = flag("--regen-max-new-tokens", "tokens per regenerated turn", 256)
    regen_temperature: float = flag("--regen-temperature", "0 = greedy, else sampled", 0.0)
    regen_batch_size: int = flag("--regen-batch-size", "prompts per generate call", 16)
    regen_max_turns: int | None = flag("--regen-max-turns", "regenerate at most this many turns", None)
    regen_max_prompt_tokens: int = flag(
        "--regen-max-prompt-tokens", "stop a conversation at a prompt longer than this", 1024
    )
    regen_time_limit: float | None = flag(
        "--regen-time-limit",
        "stop regenerating after this many seconds, keeping the turns answered so far (first turns first)",
        None,
    )
    regen_cache: str | None = flag(
        "--regen-cache", "regenerated data file (default: OUT/regenerated.jsonl)", None
    )
    val_path: str | None = flag(
        "--val-data",
        "conversations to validate the draft on while it trains, used as they are (e.g. the "
        "<regen cache>.heldout.jsonl that `draftfeed regenerate --data-holdout N` writes); default: the "
        "--data-holdout conversations' first turns, answered by the target when --regenerate",
        None,
    )

    def __post_init__(self):
        for name in (
            "seq_len",
            "batch_size",
            "regen_max_new_tokens",
            "regen_batch_size",
            "regen_max_prompt_tokens",
        ):
            _check(getattr(self, name) >= 1, f"data.{name}={getattr(self, name)} must be >= 1")
        _check(self.seq_len >= 2, f"--seq-len {self.seq_len} must be >= 2")
        _check(self.limit is None or self.limit >= 1, f"--data-limit {self.limit} must be >= 1")
        _check(self.holdout >= 0, f"--data-holdout {self.holdout} must be >= 0")
        _check(self.regen_temperature >= 0, f"--regen-temperature {self.regen_temperature} must be >= 0")
        _check(
            self.path is None or Path(self.path).expanduser().is_file(),
            f"--data {self.path!r}: no such file",
        )
        _check(
            self.val_path is None or Path(self.val_path).expanduser().is_file(),
            f"--val-data {self.val_path!r}: no such file",
        )


@dataclass
class Eagle3Config:
    """The EAGLE-3 draft and its loss (docs/architecture.md section 1)."""

    draft_vocab_size: int = flag("--draft-vocab-size", "draft vocab Vd (>= target vocab: identity)", 8192)
    ttt_steps: int = flag("--ttt-steps", "training-time-test unroll steps K", 4)
    normalization: str = flag(
        "--normalization", "masked_mean (AutoModel, default) or full_mean (EAGLE/SpecForge)", "masked_mean"
    )
    decay: float = flag("--step-decay", "weight of TTT step k is decay**k", 0.8)
    norm_output: bool = flag(None, "EAGLE-3.1: feed norm(h) to the next step", False)
    fc_norm: bool = flag(None, "EAGLE-3.1: RMSNorm per aux chunk before fc", False)

    def __post_init__(self):
        from .losses import NORMALIZATIONS

        _check(self.draft_vocab_size >= 1, f"--draft-vocab-size {self.draft_vocab_size} must be >= 1")
        _check(self.ttt_steps >= 1, f"--ttt-steps {self.ttt_steps} must be >= 1")
        _check(
            self.normalization in NORMALIZATIONS,
            f"--normalization {self.normalization!r}: expected one of {', '.join(NORMALIZATIONS)}",
        )
        _check(0 < self.decay <= 1, f"--step-decay {self.decay} must be in (0, 1]")


@dataclass
class BlockConfig:
    """The block drafts' shared settings (DFlash and DSpark, docs/architecture.md sections 2-3); unset fields take
    the algorithm's default (DFlash: block 16, gamma 7; DSpark: block 7, gamma 4)."""

    block_size: int | None = flag(
        "--block-size", "tokens per block: DFlash drafts bs-1 of them, DSpark bs (default 16 / 7)", None
    )
    num_anchors: int = flag("--num-anchors", "blocks sampled per row and step", 512)
    num_layers: int = flag("--draft-layers", "decoder layers of the block draft", 5)
    decay: float | None = flag(
        "--block-decay", "loss weight decay gamma of the block slots (0 = uniform; default 7 / 4)", None
    )
    mask_token_id: int | None = flag(
        "--mask-token-id", "token id of the block's MASK slots (default: the last vocab id)", None
    )
    num_target_layers: int = flag(
        "--num-target-layers", "K target layers feeding the draft when --layer-ids is not given", 5
    )
    chunk_rows: int = flag(None, "supervised rows per full-vocab logits chunk", 1024)

    DEFAULTS = {"dflash": (16, 7.0), "dspark": (7, 4.0)}  # algorithm -> (block_size, gamma)

    def __post_init__(self):
        _check(
            self.block_size is None or self.block_size >= 1, f"--block-size {self.block_size} must be >= 1"
        )
        _check(self.num_anchors >= 1, f"--num-anchors {self.num_anchors} must be >= 1")
        _check(self.num_layers >= 1, f"--draft-layers {self.num_layers} must be >= 1")
        _check(
            self.decay is None or self.decay >= 0, f"--block-decay {self.decay} must be >= 0 (0 = uniform)"
        )
        _check(
            self.mask_token_id is None or self.mask_token_id >= 0,
            f"--mask-token-id {self.mask_token_id} must be >= 0",
        )
        _check(self.num_target_layers >= 1, f"--num-target-layers {self.num_target_layers} must be >= 1")
        _check(self.chunk_rows >= 1, f"block.chunk_rows={self.chunk_rows} must be >= 1")

    def resolved_block_size(self, algorithm: str) -> int:
        return self.block_size if self.block_size is not None else self.DEFAULTS[algorithm][0]

    def gamma(self, algorithm: str) -> float | None:
        """The loss decay gamma; None = uniform weights."""
        g = self.decay if self.decay is not None else self.DEFAULTS[algorithm][1]
        return None if g == 0 else float(g)


@dataclass
class DSparkTrainConfig:
    """DSpark's heads and loss weights (docs/architecture.md section 3): L = 0.1 CE + 0.9 L1 + 1.0 confidence BCE."""

    ce_weight: float = flag("--ce-weight", "weight of the cross-entropy on the target's tokens", 0.1)
    tv_weight: float = flag("--tv-weight", "weight of the L1 (2 TV) distance to the target distribution", 0.9)
    conf_weight: float = flag("--conf-weight", "weight of the confidence head's BCE", 1.0)
    markov_rank: int = flag("--markov-rank", "rank r of the Markov head (0 = no Markov head)", 256)
    confidence_head: bool = flag("--confidence-head", "train the confidence head (early stop)", True)
    confidence_head_with_markov: bool = flag(
        None, "the confidence head also reads W1[prev] (needs markov_rank > 0)", True
    )

    def __post_init__(self):
        for name in ("ce_weight", "tv_weight", "conf_weight"):
            _check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 0")
        _check(self.markov_rank >= 0, f"--markov-rank {self.markov_rank} must be >= 0")
        if not self.markov_rank:
            self.confidence_head_with_markov = False


@dataclass
class OptimConfig:
    lr: float | None = flag("--lr", "peak learning rate (default: 1e-4 EAGLE-3, 6e-4 DFlash / DSpark)", None)
    betas: list[float] = flag("--betas", "AdamW betas, e.g. 0.9,0.95", default_factory=lambda: [0.9, 0.95])
    weight_decay: float = flag("--weight-decay", "AdamW weight decay", 0.0)
    warmup_ratio: float | None = flag(
        "--warmup-ratio", "linear warmup over this fraction of the steps (default 0.05 / 0.04)", None
    )
    min_lr_ratio: float = flag("--min-lr-ratio", "cosine decays to this fraction of lr", 0.1)
    grad_clip: float = flag("--grad-clip", "max gradient norm (0 = off)", 1.0)
    grad_accum: int = flag("--grad-accum", "micro-batches per optimizer step", 1)

    def __post_init__(self):
        self.betas = [float(b) for b in self.betas]
        _check(self.lr is None or self.lr > 0, f"--lr {self.lr} must be > 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"--betas {self.betas}: two values in [0, 1)",
        )
        _check(
            self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
            f"--warmup-ratio {self.warmup_ratio} must be in [0, 1)",
        )

    # algorithm -> (lr, warmup_ratio): AutoModel's EAGLE-3 / DFlash / DSpark recipes
    DEFAULTS = {"eagle3": (1e-4, 0.05), "dflash": (6e-4, 0.04), "dspark": (6e-4, 0.04)}

    def resolve(self, algorithm: str) -> None:
        """Fill the unset lr / warmup with `algorithm`'s defaults."""
        lr, warmup = self.DEFAULTS.get(algorithm, self.DEFAULTS["eagle3"])
        self.lr = lr if self.lr is None else self.lr
        self.warmup_ratio = warmup if self.warmup_ratio is None else self.warmup_ratio
        _check(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio {self.min_lr_ratio} must be in [0, 1]")
        _check(self.grad_clip >= 0, f"--grad-clip {self.grad_clip} must be >= 0")
        _check(self.grad_accum >= 1, f"--grad-accum {self.grad_accum} must be >= 1")
        _check(self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0")


@dataclass
class LoopConfig:
    steps: int | None = flag("--steps", "optimizer steps (default: --epochs over the data)", None)
    epochs: int = flag("--epochs", "passes over the data when --steps is not given", 1)
    prefetch: int = flag("--prefetch", "target batches in flight ahead of training", 2)
    time_limit: float | None = flag(
        "--time-limit",
        "stop after this many seconds of training (checkpoint and export as usual); the lr schedule then "
        "anneals by whichever ends first, the steps or the time. A resumed run counts its own seconds: its "
        "schedule spans the earlier runs' seconds plus these",
        None,
    )
    bf16: bool = flag("--bf16", "bf16 autocast for the draft on GPU", True)
    compile: str = flag(
        "--compile",
        "torch.compile of the draft step's fused kernels (soft cross-entropy, full-vocab objective): auto "
        "(on CUDA only), on, off; a compiler failure falls back to eager with a warning",
        "auto",
    )
    device: str = flag(
        "--device", "trainer device: auto (cuda:LOCAL_RANK when available), cpu, cuda:N", "auto"
    )
    log_every: int = flag("--log-every", "optimizer steps between progress lines / metrics", 10)
    progress: str = flag(
        "--progress", "progress bar on stderr: auto (when it is a terminal), on, off", "auto"
    )
    save_every: int = flag(
        "--save-every",
        "optimizer steps between checkpoints (0: only at the end; SIGINT / SIGTERM also save one)",
        500,
    )
    keep_checkpoints: int = flag("--keep-checkpoints", "checkpoints kept on disk", 2)
    val_every: int | None = flag(
        "--val-every",
        "optimizer steps between validations on the held-out or --val-data conversations, written to "
        "OUT/validation.jsonl (default: at every checkpoint and at the end; 0: never)",
        None,
    )
    val_batches: int = flag("--val-batches", "validate on at most this many batches", 16)
    val_answer_tokens: int = flag(
        "--val-answer-tokens",
        "val_tau_decode decodes the first N tokens of each held-out answer, as `draftfeed eval "
        "--max-new-tokens N` decodes a prompt",
        EVAL_MAX_NEW_TOKENS,
    )
    resume: str | None = flag("--resume", "a checkpoint directory, or 'auto' (the latest in OUT)", None)
    export: bool = flag("--export", "write the SGLang/vLLM draft to OUT/export at the end", True)
    tensorboard: bool = flag("--tensorboard", "also log to TensorBoard when it is installed", True)

    def __post_init__(self):
        _check(self.steps is None or self.steps >= 1, f"--steps {self.steps} must be >= 1")
        _check(self.epochs >= 1, f"--epochs {self.epochs} must be >= 1")
        _check(self.prefetch >= 1, f"--prefetch {self.prefetch} must be >= 1")
        _check(self.time_limit is None or self.time_limit > 0, f"--time-limit {self.time_limit} must be > 0")
        _check(self.log_every >= 1, f"--log-every {self.log_every} must be >= 1")
        _check(self.compile in ("auto", "on", "off"), f"--compile {self.compile!r}: expected auto, on or off")
        _check(
            self.progress in ("auto", "on", "off"), f"--progress {self.progress!r}: expected auto, on or off"
        )
        _check(self.save_every >= 0, f"--save-every {self.save_every} must be >= 0")
        _check(self.keep_checkpoints >= 1, f"--keep-checkpoints {self.keep_checkpoints} must be >= 1")
        _check(self.val_every is None or self.val_every >= 0, f"--val-every {self.val_every} must be >= 0")
        _check(self.val_batches >= 1, f"--val-batches {self.val_batches} must be >= 1")
        _check(self.val_answer_tokens >= 2, f"--val-answer-tokens {self.val_answer_tokens} must be >= 2")

    def validation_period(self) -> int:
        """Optimizer steps between validations (0: only at the end; None-valued flag: the checkpoints')."""
        return self.save_every if self.val_every is None else self.val_every


@dataclass
class DistConfig:
    """Filled from torchrun's RANK / WORLD_SIZE / LOCAL_RANK by the CLI (the only place that reads them)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU

    def __post_init__(self):
        _check(self.world_size >= 1, f"WORLD_SIZE={self.world_size} must be >= 1")
        _check(
            0 <= self.rank < self.world_size, f"RANK={self.rank} must be in [0, WORLD_SIZE={self.world_size})"
        )
        _check(self.backend in ("auto", "gloo", "nccl"), f"dist backend {self.backend!r}: auto, gloo or nccl")


@dataclass
class TrainConfig:
    out: str = flag("--out", "output directory: checkpoints, metrics, export")
    algorithm: str = flag(None, "draft algorithm (the positional argument of `draftfeed train`)", "eagle3")
    seed: int = flag("--seed", "seed of the draft init and the data order", 0)
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eagle3: Eagle3Config = field(default_factory=Eagle3Config)
    block: BlockConfig = field(default_factory=BlockConfig)
    dspark: DSparkTrainConfig = field(default_factory=DSparkTrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        from .algorithms import ALGORITHMS

        _check(bool(self.out), "--out DIR is required")
        _check(
            self.algorithm in ALGORITHMS,
            f"algorithm {self.algorithm!r} is not known; expected one of {', '.join(sorted(ALGORITHMS))}",
        )
        self.optim.resolve(self.algorithm)
        if self.algorithm in BlockConfig.DEFAULTS:
            _check(
                self.block.resolved_block_size(self.algorithm) >= (2 if self.algorithm == "dflash" else 1),
                f"--block-size {self.block.block_size}: DFlash needs >= 2 (slot 0 is the anchor)",
            )

    @property
    def out_dir(self) -> Path:
        return Path(self.out).expanduser()

    def regen_cache_path(self) -> Path:
        return (
            Path(self.data.regen_cache).expanduser()
            if self.data.regen_cache
            else self.out_dir / "regenerated.jsonl"
        )

    def heldout_regen_path(self) -> Path:
        """The held-out conversations' first turns answered by the target, beside the regenerated data."""
        p = self.regen_cache_path()
        return p.with_name(p.name.removesuffix(".jsonl") + ".heldout.jsonl")


@dataclass
class EvalConfig:
    """`draftfeed eval`: acceptance length of an exported draft against the in-process target."""

    draft: str = flag(
        "--draft",
        "exported draft directory (config.json + model.safetensors) of EAGLE-3, DFlash or DSpark; the "
        "algorithm is read from its config.json",
    )
    target_model: str | None = flag(
        "--target-model", "target checkpoint (default: built-in SmolLM2-135M-Instruct)", None
    )
    prompts: list[str] = flag(
        "--prompts",
        "prompt sets: mtbench, humaneval, or a chat JSON/JSONL file",
        default_factory=lambda: ["mtbench"],
    )
    limit: int | None = flag("--limit", "prompts per set", None)
    num_draft_tokens: int = flag(
        "--num-draft-tokens",
        "K: EAGLE-3 chain drafting steps per verification (block drafts propose their block: DFlash bs-1, "
        "DSpark bs tokens)",
        4,
    )
    confidence_threshold: float = flag(
        "--confidence-threshold",
        "DSpark early stop theta: verify drafts up to the first with confidence < theta (0 = off)",
        0.0,
    )
    max_new_tokens: int = flag("--max-new-tokens", "tokens generated per prompt", EVAL_MAX_NEW_TOKENS)
    device: str = flag("--device", "auto (cuda when available), cpu, cuda:N", "auto")
    dtype: str = flag(
        "--dtype", "target and draft dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float32", "auto"
    )
    untrained: bool = flag(
        "--untrained", "measure the draft with re-initialised weights (the baseline)", False
    )
    cuda_graphs: bool = flag(
        "--cuda-graphs",
        "capture the target's verify / decode steps and the EAGLE-3 draft steps as CUDA graphs",
        True,
    )
    compile: str = flag(
        "--compile",
        "torch.compile of the draft's fused kernels (RMSNorm, RoPE, gated MLP: the training step's) in its "
        "drafting steps, fewer kernels a draft step: auto (on CUDA), on, off",
        "auto",
    )
    checkpoint: str | None = flag(
        "--checkpoint",
        "a training checkpoint directory (OUT/checkpoints/step_N) of the same run: its draft weights replace "
        "the export's (tau along the training)",
        None,
    )
    out: str | None = flag("--out", "also write the results as JSON here", None)
    progress: str = flag(
        "--progress", "progress bar on stderr: auto (when it is a terminal), on, off", "auto"
    )

    def __post_init__(self):
        _check(bool(self.draft), "--draft DIR is required")
        _check(
            self.progress in ("auto", "on", "off"), f"--progress {self.progress!r}: expected auto, on or off"
        )
        _check(Path(self.draft).expanduser().is_dir(), f"--draft {self.draft!r}: no such directory")
        _check(
            self.checkpoint is None or (Path(self.checkpoint).expanduser() / "trainer.pt").is_file(),
            f"--checkpoint {self.checkpoint!r}: expected a checkpoint directory holding trainer.pt",
        )
        _check(self.num_draft_tokens >= 1, f"--num-draft-tokens {self.num_draft_tokens} must be >= 1")
        _check(
            0 <= self.confidence_threshold <= 1,
            f"--confidence-threshold {self.confidence_threshold} must be in [0, 1]",
        )
        _check(self.max_new_tokens >= 1, f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        _check(
            self.dtype == "auto" or self.dtype in _model_dtype_names(),
            f"--dtype {self.dtype!r}: expected auto, bfloat16, float16 or float32",
        )
        _check(self.limit is None or self.limit >= 1, f"--limit {self.limit} must be >= 1")
        _check(self.compile in ("auto", "on", "off"), f"--compile {self.compile!r}: expected auto, on or off")
        prompts = []
        for p in self.prompts:
            prompts += [x.strip() for x in str(p).split(",") if x.strip()]
        self.prompts = prompts
        for p in self.prompts:
            _check(
                p in PROMPT_SETS or Path(p).expanduser().is_file(),
                f"--prompts {p!r}: expected {' or '.join(PROMPT_SETS)} or an existing file",
            )


def _model_dtype_names() -> tuple[str, ...]:
    from draftfeed.client.dtypes import MODEL_DTYPE_NAMES  # imports torch: not at `draftfeed --help`

    return MODEL_DTYPE_NAMES
