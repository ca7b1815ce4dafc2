"""DIH's intermediate heads: building them on a teacher, saving/loading them, and the cohort forward."""
import fnmatch
import os
import re
from pathlib import Path

import torch
from torch import nn

from dihkit.files.checkpoints import FORMAT, atomic_save, check_finite, check_state_dict, digest_tensors, safe_load
from dihkit.foundations.errors import UserError
from dihkit.runs.folding import folded

# The form of the paper's heads, and of every head file written before head files recorded their form.
FLATTEN = "flatten"
# The exact name of head i (1, 2, ... without leading zeros); anything else named like a head is a stray.
HEAD_FILE = re.compile(r"^head_([1-9][0-9]*)\.pth$")


class IntermediateHead(nn.Module):
    """One linear layer on a mount point's feature map, no non-linearity: the map flattened (the paper's CIFAR
    heads), or with ``pool`` average-pooled to ``pool x pool`` first (heads on the ImageNet-layout networks,
    whose flattened maps would need 200M weights for 1,000 classes; docs/IMAGENET.md). ``form`` names which,
    and each head file records it."""

    def __init__(self, in_features: int, num_classes: int, pool: int | None = None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool) if pool else nn.Identity()
        self.form = f"avgpool {pool}x{pool}" if pool else FLATTEN
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """Logits of one mount-point feature map."""
        return self.fc(torch.flatten(self.pool(feat), 1))


def mount_shapes(teacher: nn.Module, image_size: int) -> list[tuple[int, ...]]:
    """Shapes (C, H, W) of the teacher's mount-point features, from a dry run at the input size."""
    was_training = teacher.training
    teacher.eval()
    param = next(teacher.parameters())
    with torch.no_grad():
        _, feats, _ = teacher(torch.zeros(1, 3, image_size, image_size, device=param.device), features=True)
    teacher.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]


def build_heads(teacher: nn.Module, num_classes: int, image_size: int) -> nn.ModuleList:
    """One IntermediateHead per mount point of ``teacher``, sized by a dry run, of the form the teacher's
    ``head_pool`` asks for (flatten, or average-pool first)."""
    pool = getattr(teacher, "head_pool", None)
    return nn.ModuleList(IntermediateHead(c * (pool * pool if pool else h * w), num_classes, pool)
                         for c, h, w in mount_shapes(teacher, image_size))


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for a teacher or heads that must not change."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Cohort:
    """The frozen teacher and its frozen heads: one forward pass gives all k+1 logits.

    Deliberately not an ``nn.Module`` attribute of any trainable module, so optimizers, state dicts,
    ``.train()`` and DDP never see it.
    """

    def __init__(self, teacher: nn.Module, heads: nn.ModuleList | None = None):
        self.teacher = freeze(teacher)
        self.heads = freeze(heads) if heads is not None else nn.ModuleList()

    def to(self, *args, **kwargs) -> "Cohort":
        """Move or convert the teacher and the heads in place, as ``nn.Module.to`` does (device, memory format)."""
        self.teacher.to(*args, **kwargs)
        self.heads.to(*args, **kwargs)
        return self

    def fold(self) -> int:
        """Replace teacher and heads by copies whose batch norms are folded into the convolutions before them
        (``dihkit.runs.folding``; the modules given stay as they were): the same outputs up to float rounding,
        in fewer passes. Returns how many batch norms were folded."""
        self.teacher, in_teacher = folded(self.teacher)
        self.heads, in_heads = folded(self.heads)
        return in_teacher + in_heads

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[final teacher logits, head_1 logits, ..., head_k logits] without building a graph."""
        logits, feats, _ = self.teacher(x, features=True)
        return [logits] + [head(f) for head, f in zip(self.heads, feats)]

    @torch.no_grad()
    def features(self, x: torch.Tensor):
        """The teacher's (logits, mount features, embedding), without a graph."""
        return self.teacher(x, features=True)


def fingerprint(model: nn.Module) -> str:
    """SHA-1 of a model's weights and buffers: ties heads to the exact teacher they were tuned on."""
    return digest_tensors(model.state_dict().items())


def heads_meta(teacher_arch: str, num_classes: int, image_size: int, dataset: str, shapes,
               teacher_fingerprint: str) -> dict:
    """What a head file records about the teacher it belongs to."""
    return {"teacher_arch": teacher_arch, "num_classes": num_classes, "image_size": image_size,
            "dataset": dataset, "num_heads": len(shapes), "mount_shapes": [list(s) for s in shapes],
            "teacher_fingerprint": teacher_fingerprint}


def save_heads(heads: nn.ModuleList, directory, meta: dict, per_head: list | None = None, **extra) -> list[Path]:
    """Write ``head_1.pth`` ... ``head_k.pth`` into ``directory`` atomically, each with its teacher's record
    (``per_head``: one dict more per head, e.g. the epoch it was kept at)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, head in enumerate(heads, start=1):
        path = directory / f"head_{i}.pth"
        own = per_head[i - 1] if per_head else {}
        form = {"head_form": head.form} if isinstance(head, IntermediateHead) else {}
        record = {"format": FORMAT, "kind": "head", "index": i, **meta, **extra, **own, **form,
                  "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}
        atomic_save(record, path)
        paths.append(path)
    # Heads beyond k left by an earlier run (another teacher), or strays, would make the folder fail to load.
    for p in directory.iterdir():
        if looks_like_head(p.name) and p not in paths:
            p.unlink()
    return paths


def looks_like_head(name: str) -> bool:
    """Whether a file name looks like a head file (``head_*.pth``), exactly named or not."""
    return fnmatch.fnmatchcase(name, "head_*.pth")


def list_heads(directory) -> dict[int, Path]:
    """The head files of a heads folder by number, refusing a missing or empty folder and any file that looks
    like a head (``head_*.pth``, e.g. ``head_02.pth``) but is not exactly named ``head_<i>.pth``."""
    directory = Path(directory)
    if not os.path.isdir(directory):  # also a name too long to look up
        raise UserError(f"heads directory '{directory}' does not exist")
    found = {}
    for p in sorted(directory.iterdir()):
        if looks_like_head(p.name):
            m = HEAD_FILE.match(p.name)
            if m is None:
                raise UserError(f"heads directory '{directory}' holds '{p.name}', which looks like a head file but is "
                                f"not named head_<i>.pth (i = 1, 2, ... without leading zeros); remove or rename it")
            found[int(m.group(1))] = p
    if not found:
        raise UserError(f"heads directory '{directory}' holds no head_<i>.pth files; "
                        f"run --training_type fine_tune first")
    return found


def read_head(path: Path, i: int, expect: dict) -> dict:
    """Head file ``path``, checked: a head of this toolkit, number ``i``, finite weights, and recorded for a
    teacher with the ``expect``ed values (a value of None is not checked)."""
    rec = safe_load(path, "head file")
    if rec.get("format") != FORMAT or rec.get("kind") != "head" or not isinstance(rec.get("state_dict"), dict):
        raise UserError(f"head file '{path}' is not a head checkpoint of this toolkit")
    if rec.get("index") != i:
        raise UserError(f"head file '{path}' holds head {rec.get('index')}, not head {i}; was it renamed?")
    for key, value in expect.items():
        if value is not None and rec.get(key) != value:
            raise UserError(f"head file '{path}' belongs to a teacher with {key}={rec.get(key)}, "
                            f"but this teacher has {key}={value}")
    check_finite(rec["state_dict"], "head file", path)
    return rec


def saved_by(rec: dict) -> tuple:
    """Which run and epoch wrote a head file: (seed, epoch, how the epoch was selected)."""
    return rec.get("seed"), rec.get("epoch"), rec.get("selected_on")


def head_records(directory: Path, found: dict, k: int, arch: str, expect: dict) -> list[dict]:
    """The checked records (``read_head``) of head_1..head_k of a ``arch`` teacher, refusing a missing or
    extra head and heads saved by different runs or epochs (a folder whose writing was interrupted)."""
    missing = [i for i in range(1, k + 1) if i not in found]
    if missing:
        raise UserError(f"heads directory '{directory}' lacks head_{missing[0]}.pth; a {arch} teacher has {k} heads")
    extra = sorted(i for i in found if i > k)
    if extra:
        raise UserError(f"heads directory '{directory}' has an extra head_{extra[0]}.pth; "
                        f"a {arch} teacher has {k} heads")
    records = []
    for i in range(1, k + 1):
        rec = read_head(found[i], i, expect)
        if records and saved_by(rec) != saved_by(records[0]):
            raise UserError(f"head file '{found[i]}' was saved by another run or epoch (seed, epoch, selection "
                            f"{saved_by(rec)}) than head_1.pth ({saved_by(records[0])}); fine-tune the heads again")
        records.append(rec)
    return records


def check_heads_folder(directory, teacher_arch: str | None, num_classes: int | None, dataset: str) -> None:
    """Refuse a heads folder from its files alone, before any data is read: strays, a missing or extra head,
    heads of another teacher architecture, class count or dataset, of different runs, or with corrupted or
    non-finite weights (``None``: not checked). The head count is the one the files record."""
    directory = Path(directory)
    found = list_heads(directory)
    first = safe_load(found[min(found)], "head file")
    k = first.get("num_heads") if isinstance(first.get("num_heads"), int) else len(found)
    expect = {"teacher_arch": teacher_arch, "num_classes": num_classes, "dataset": dataset}
    head_records(directory, found, k, teacher_arch or first.get("teacher_arch"), expect)


def load_heads(directory, teacher: nn.Module, meta: dict, heads: nn.ModuleList | None = None) -> nn.ModuleList:
    """Load the heads in ``directory`` and check them against the teacher described by ``meta``.

    The files are matched by their number (``head_2`` before ``head_10``); a stray, missing, extra or
    mismatched head is a UserError naming it, and so are heads saved by different runs or epochs or
    fine-tuned on another checkpoint. ``heads`` are the modules to load into (other methods' heads, e.g.
    TOFD's auxiliary classifiers); by default DIH heads built on ``teacher``.
    """
    directory = Path(directory)
    found = list_heads(directory)
    if heads is None:
        with torch.random.fork_rng(devices=[]):  # loaded weights: no draws from the run's RNG (load_trained)
            heads = build_heads(teacher, meta["num_classes"], meta["image_size"])
    expect = {key: meta[key] for key in ("teacher_arch", "num_classes", "image_size", "num_heads")}
    records = head_records(directory, found, len(heads), meta["teacher_arch"], expect)
    for i, (head, rec) in enumerate(zip(heads, records), start=1):
        if rec.get("teacher_fingerprint") != meta["teacher_fingerprint"]:
            raise UserError(f"head file '{found[i]}' was fine-tuned on a different {meta['teacher_arch']} "
                            f"checkpoint than --saved_path; fine-tune heads for this teacher")
        if isinstance(head, IntermediateHead) and rec.get("head_form", FLATTEN) != head.form:
            raise UserError(f"head file '{found[i]}' holds a head of form '{rec.get('head_form', FLATTEN)}', but DIH "
                            f"heads on a {meta['teacher_arch']} are '{head.form}'; fine-tune heads for this teacher")
        check_state_dict(head, rec["state_dict"], "head file", found[i])
        head.load_state_dict(rec["state_dict"])
    return heads
