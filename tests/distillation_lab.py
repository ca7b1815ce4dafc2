"""The distillation tests' world, cases and runs, shared by tests/test_distillation.py and the margins' measurement
(tests/measure_distillation.py).

The world: 8 px colour classes; a res8 teacher trained on clean labels and its three DIH heads; the students
see the same images with half their training labels redrawn at random, so the teacher knows what their
labels teach slowly. Each case is trained, in process, from the same weights, seed and batches, as:

- ``method``: the training type with the case's flags;
- ``twin``: the same, every weight of the method kept (the CE weight included), the distillation terms'
  weights set to 0 by flags (``Case.twin``) and, for a term no flag weighs, its loss function multiplied by 0
  (``Case.zeroed``);
- ``control`` (the negative control): the method's own flags, with every distillation term of the toolkit
  computed on the student's tensors with their value kept and their gradient stopped (``STOPPED``). It keeps
  the method's loss value and loses only the teacher's gradient, so it must fail the check the method passes;
- ``teacher_heads`` (DIH, TOFD, MHKD): the method with its frozen heads answering what the teacher's final
  classifier answers (``teacher_as_heads``), the control of the heads checks (``HEADS_CHECKS``);
- ``kd_at_dih_weights``: KD at DIH's summed weights, the comparator of DIH's heads check.

Every reference the distances use is computed here from the files, with the model's own forward for the
teacher and plain torch operations for DIH's and MHKD's heads (TOFD's are the rest of a res8, its own blocks
loaded from the files): never through ``dih_utils.Cohort`` or ``load_heads``, the code under test.
"""
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import dataload
import dih_utils
import KD_Loss
import train_at
import train_fitnets
import train_funcs
import training_types  # noqa: F401  (fills the registry)
from console import run_inprocess
from CRD import crd
from dihkit.foundations.registry import REGISTRY
from dihkit.methods.feature_baselines import default_heads_dir
from faults import make_imagefolder
from models_repo import build_model
from TOFD import tofd

NOISY_WORLD = ["--dataset", "imagefolder", "--gpu_id", "cpu", "--num_workers", "0", "--teacher", "res8",
               "--student", "res8", "--no_cache"]
CLASSES = 10
CLOSENESS_T = 4.0
# Three epochs of 20 batches at a constant lr 0.1. Two epochs would save a third of the time but close the gaps.
STUDENT = [*NOISY_WORLD, "--batch_size", "20", "--epochs", "3", "--schedule", "3"]
SEEDS = (7, 8, 9)   # the seeds every margin is measured on; the default suite runs the first


def make_noisy_world(folder):
    """``folder/clean`` and ``folder/noisy`` (the same images, half the training labels redrawn), a res8
    ``folder/teacher.pth`` trained on the clean labels and its three heads ``folder/heads``."""
    for name, noise in (("clean", 0.0), ("noisy", 0.5)):
        make_imagefolder(folder / name, train_per_class=40, test_per_class=30, size=8, label_noise=noise,
                         spread=50, classes=CLASSES)
    teacher = [*NOISY_WORLD, "--data_dir", folder / "clean", "--seed", "3", "--batch_size", "32"]
    assert run_inprocess([*teacher, "--training_type", "ce", "--epochs", "8", "--schedule", "7",
                          "--path_to_save", folder / "teacher.pth"]) == 0
    # lr 0.01: at the recipe's 0.1 the flattened heads overshoot (tests/test_learning.py, fine_tune).
    assert run_inprocess([*teacher, "--training_type", "fine_tune", "--saved_path", folder / "teacher.pth",
                          "--lr", "0.01", "--epochs", "2", "--schedule", "1", "--path_to_save", folder / "heads"]) == 0
    return folder


@dataclass(frozen=True)
class Case:
    """One distillation test: the type and its flags, what switches its distillation off in the twin, and the
    margin by which the method's distance from the teacher must be below its twin's (a fraction of it)."""
    type: str
    margin: float
    flags: tuple = ()
    twin: tuple = ()            # flags that set its distillation terms' weights to 0, the CE weight kept
    zeroed: tuple = ()          # (module, function) pairs whose value the twin multiplies by 0: no flag weighs them


# The KD family's twin: KD weight 0 beside the method's CE weight 1 - alpha = 0.9 (``--kd_alpha 0`` would raise it
# to 1.0, and that alone brings the student closer to the teacher: the issue measured ratio 0.88 for kd).
NO_KD = ("--ce_weight", "0.9", "--kd_weight", "0")
# Each margin is half the smallest gap ``1 - distance(method) / distance(twin)`` on seeds 7, 8 and 9, rounded down
# (the three ratios beside each case: `python3 tests/measure_distillation.py`, 2-core CPU, one thread; seed 10,
# measured too, passes every case).
CASES = {
    "kd": Case("kd", 0.14, twin=NO_KD),                                                     # 0.549 0.536 0.720
    "dih": Case("dih", 0.09, twin=NO_KD),                                                   # 0.688 0.804 0.794
    # DKD's NCKD weight is 1 here: at mdistiller's CIFAR ResNet 2 the student of seed 8 ends as far from the teacher
    # as its twin (ratios 0.245, 1.004, 0.201 on seeds 7, 8, 9), at the default 8 farther (1.316, 1.464, 2.293).
    # DIH[DKD] also needs lr 0.05, twin included: at 0.1 the ratios are 1.407, 0.745, 0.658.
    "dih --cohort_loss dkd": Case("dih", 0.19, ("--cohort_loss", "dkd", "--dkd_beta", "1", "--dkd_warmup", "1",
                                                "--kd_temperature", "4", "--lr", "0.05"),
                                  twin=("--dkd_alpha", "0", "--dkd_beta", "0")),          # 0.348 0.612 0.405
    "dih --cohort_loss dist": Case("dih", 0.09, ("--cohort_loss", "dist", "--kd_temperature", "1"),
                                   twin=("--dist_beta", "0", "--dist_gamma", "0")),       # 0.538 0.806 0.674
    # LS's own runs weigh KD 9 to CE's 0.1: at DIH's alpha 0.1 the standardised logits' KL at T 2 is small beside the
    # summed CE on labels half of which are noise, and the student cannot be told from its twin (ratios 0.943,
    # 0.726, 1.176, 0.616 on seeds 7 to 10); at weights 0.5 and 0.5 it can.
    "dih --logit_std": Case("dih", 0.22, ("--logit_std", "--ce_weight", "0.5", "--kd_weight", "0.5"),
                            twin=("--kd_weight", "0")),                                    # 0.265 0.521 0.550
    # The DIH of the heads check (HEADS_CHECKS).
    "dih --ce_weight 0.5 --kd_weight 0.5": Case("dih", 0.33, ("--ce_weight", "0.5", "--kd_weight", "0.5",
                                                              "--lr", "0.05"),
                                                twin=("--kd_weight", "0")),                # 0.162 0.327 0.191
    "dkd": Case("dkd", 0.22, ("--dkd_beta", "1", "--dkd_warmup", "1"),
                twin=("--dkd_alpha", "0", "--dkd_beta", "0")),                            # 0.390 0.541 0.272
    "dist": Case("dist", 0.11, twin=("--dist_beta", "0", "--dist_gamma", "0")),             # 0.736 0.711 0.779
    # Stage 1's hint loss has no weight flag; stage 2 is KD.
    "fitnets": Case("fitnets", 0.10, ("--epochs_fitnets_1", "1"), twin=NO_KD,
                    zeroed=((train_fitnets, "hint_loss"),)),                               # 0.531 0.628 0.786
    # Both hops train here; in the twin both are CE at the method's weight. At alpha 0.1 and lr 0.1 the assistant
    # passes on too little (ratios 0.890, 0.953, 0.958, 0.881 on seeds 7 to 10); at weights 0.5 and 0.5 and lr 0.05
    # both hops distil.
    "takd": Case("takd", 0.24, ("--ta", "res8", "--ce_weight", "0.5", "--kd_weight", "0.5", "--lr", "0.05"),
                 twin=("--ce_weight", "0.5", "--kd_weight", "0")),                         # 0.284 0.510 0.295
    "at": Case("at", 0.26, twin=("--at_beta", "0")),                                        # 0.291 0.461 0.233
    # CRD's CE weight is 1 whatever --kd_alpha.
    "crd": Case("crd", 0.13, twin=("--kd_alpha", "0", "--beta", "0")),                      # 0.566 0.552 0.727
    # The soft cross-entropy to the teacher's classifiers has no weight flag; --kd_alpha weighs the features. At lr
    # 0.1 its heads check fails (heads ratios 0.481, 0.914, 0.814, 1.014 on seeds 7 to 10); at lr 0.02 it holds.
    "tofd": Case("tofd", 0.09, ("--lr", "0.02"), twin=("--kd_alpha", "0"),
                 zeroed=((tofd, "soft_cross_entropy"),)),                                  # 0.758 0.721 0.810
    # At its defaults (alpha 0.1, beta 1) MHKD's heads, tuned on the students' noisy labels, teach its student's
    # heads too little to tell from its twin's (heads ratios 0.955, 0.292, 0.952 on seeds 7 to 9); the heads' KD
    # weight 4 beside weights 0.5 and 0.5 can.
    "mhkd": Case("mhkd", 0.41, ("--beta", "4", "--ce_weight", "0.5", "--kd_weight", "0.5"),
                 twin=("--ce_weight", "0.5", "--kd_weight", "0", "--beta", "0")),          # 0.179 0.110 0.132
}


@dataclass(frozen=True)
class HeadsCheck:
    """A check that only a method whose heads teach passes: its student ends closer to the teacher's heads than
    the ``comparator`` run's student, by ``margin``; its ``control``, the method with the teacher's final
    classifier answering in its heads' place (``teacher_as_heads``), must fail it."""
    margin: float
    comparator: str
    control: str = "teacher_heads"


# DIH's student (its logits) against KD's at the same seed and weights, from the same weights; TOFD's and MHKD's
# students (their own heads, stage by stage) against their twins', whose heads learnt from the labels alone. DIH's
# own alpha of 0.1 cannot be told from KD here: the summed CE on labels half of which are noise (weight 4 x 0.9)
# drowns the heads' signal (ratios 1.411, 0.622, 0.984 on seeds 7, 8, 9; 1.541, 1.039, 1.149 at lr 0.05). At
# weights 0.5 and 0.5 it can (at lr 0.1 the ratio reaches 0.546 on seed 9). Margins and ratios as CASES'.
HEADS_CHECKS = {
    "dih --ce_weight 0.5 --kd_weight 0.5": HeadsCheck(0.29, "kd_at_dih_weights"),         # 0.165 0.419 0.184
    "tofd": HeadsCheck(0.14, "twin"),                                                       # 0.565 0.712 0.624
    "mhkd": HeadsCheck(0.04, "twin"),                                                       # 0.902 0.289 0.439
}
# DIH's loss with every head replaced by the teacher: KD at 4 x DIH's weights (the teacher and 3 heads, each member
# 0.5 x T^2 KL + 0.5 x CE), the KD student the DIH student is compared with.
KD_AT_DIH_WEIGHTS = ("--ce_weight", "2", "--kd_weight", "2")


def without_gradient(t):
    """``t`` (or each tensor of a list) with its value kept and its gradient stopped; the graph stays, so a
    loss made of it alone still back-propagates (zeros)."""
    if isinstance(t, (list, tuple)):
        return type(t)(without_gradient(x) for x in t)
    return t.detach() + 0 * t


def student_stopped(function, position: int = 0):
    """``function`` with its ``position``-th argument (the student's tensor) passed through ``without_gradient``."""
    def stopped(*args, **kwargs):
        args = list(args)
        args[position] = without_gradient(args[position])
        return function(*args, **kwargs)
    return stopped


def times_zero(function):
    """``function`` with its value multiplied by 0: the term and its gradient vanish, the graph stays."""
    return lambda *args, **kwargs: 0 * function(*args, **kwargs)


# Every distillation term of the toolkit, by where its loss function is looked up, and the position of the
# student's tensor among its arguments. KD, DIH, TAKD, FitNets' stage 2 and MHKD reach KD_Loss.soft_kl through
# kd_kl_term; CRD imports soft_kl itself.
STOPPED = ((KD_Loss, "soft_kl", 0), (KD_Loss, "dkd_terms", 0), (KD_Loss, "dist_terms", 0), (crd, "soft_kl", 0),
           (crd.CRDMethod, "contrast", 1), (train_fitnets, "hint_loss", 0), (train_at, "at_loss", 0),
           (tofd, "soft_cross_entropy", 0), (tofd, "feature_distance", 0))


def cohort_of_teachers(self, x):
    """``Cohort.__call__`` with every head answering the teacher's final logits."""
    logits = self.teacher(x)
    return [logits] * (1 + len(self.heads))


def frozen_classifiers_as_teacher(function):
    """TOFD's ``classifier_outputs`` with a frozen network's auxiliary classifiers answering its final classifier."""
    def outputs(net, aux, x):
        out = function(net, aux, x)
        frozen = not any(p.requires_grad for p in net.parameters())
        return [out[-1]] * len(out) if frozen else out
    return outputs


def teacher_as_heads(mp) -> None:
    """Within ``mp``: every frozen head (DIH's and MHKD's through ``Cohort``, TOFD's auxiliary classifiers)
    answers what the teacher's final classifier answers."""
    mp.setattr(dih_utils.Cohort, "__call__", torch.no_grad()(cohort_of_teachers))
    mp.setattr(tofd, "classifier_outputs", frozen_classifiers_as_teacher(tofd.classifier_outputs))


def gradient_stopped(mp) -> None:
    """Within ``mp``: every distillation term of ``STOPPED`` sees the student's tensor without its gradient."""
    for owner, name, position in STOPPED:
        mp.setattr(owner, name, student_stopped(getattr(owner, name), position))


# ----------------------------------------------------------------------------------------------------------
# References, from the files with plain torch operations
# ----------------------------------------------------------------------------------------------------------

def load_teacher_file(path):
    """The res8 teacher in eval mode, its weights read from ``path`` (weights only)."""
    teacher = build_model("res8", CLASSES)
    teacher.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    return teacher.eval()


def head_states(folder) -> list[dict]:
    """The state dicts of ``folder/head_1.pth``, ``head_2.pth``, ... in number order."""
    states, i = [], 1
    while (folder / f"head_{i}.pth").is_file():
        states.append(torch.load(folder / f"head_{i}.pth", weights_only=True)["state_dict"])
        i += 1
    return states


def dih_heads(states: list[dict], feats: list) -> list[torch.Tensor]:
    """DIH's heads: flatten each stage output and apply its head's linear layer."""
    return [F.linear(f.flatten(1), s["fc.weight"], s["fc.bias"]) for s, f in zip(states, feats, strict=True)]


def conv_bn_relu(x, state: dict, prefix: str) -> torch.Tensor:
    """3x3 convolution (no bias), batch norm with its running statistics, ReLU."""
    x = F.conv2d(x, state[f"{prefix}.0.weight"], padding=1)
    bn = {k: state[f"{prefix}.1.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    return F.relu(F.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], eps=1e-5))


def mhkd_heads(states: list[dict], feats: list) -> list[torch.Tensor]:
    """MHKD's heads: conv-BN-ReLU twice, global average pooling, fc-ReLU-fc."""
    out = []
    for s, f in zip(states, feats, strict=True):
        v = conv_bn_relu(conv_bn_relu(f, s, "convs.0"), s, "convs.1").mean((2, 3))
        out.append(F.linear(F.relu(F.linear(v, s["fc.0.weight"], s["fc.0.bias"])), s["fc.2.weight"], s["fc.2.bias"]))
    return out


def tofd_heads(states: list[dict], feats: list) -> list[torch.Tensor]:
    """TOFD's auxiliary classifiers (the rest of a res8 after their stage: the model's own blocks, loaded)."""
    out = []
    for i, (s, f) in enumerate(zip(states, feats)):
        aux = tofd.AuxClassifier("res8", CLASSES, i)
        aux.load_state_dict(s)
        out.append(aux.eval()(f))
    return out


TEACHER_HEADS = {"dih": dih_heads, "tofd": tofd_heads, "mhkd": mhkd_heads}


def kl_distance(student: torch.Tensor, references: list, logit_std: bool = False) -> float:
    """Mean over ``references`` of ``KL(softmax(r / T) || softmax(s / T))`` averaged over the images;
    standardised logits at the logit-standardisation temperature with ``logit_std``."""
    t = KD_Loss.LOGIT_STD_TEMPERATURE if logit_std else CLOSENESS_T
    norm = KD_Loss.standardize_logits if logit_std else (lambda z: z)
    kls = [F.kl_div(F.log_softmax(norm(student) / t, 1), F.log_softmax(norm(r) / t, 1), reduction="batchmean",
                    log_target=True) for r in references]
    return float(sum(kls) / len(kls))


def attention_distance(student_feats: list, teacher_feats: list) -> float:
    """The sum over the stage pairs of the mean squared difference of the attention maps
    ``normalize(mean_c F^2)``, the larger map's features average-pooled to the smaller size first."""
    total = 0.0
    for s, t in zip(student_feats, teacher_feats, strict=True):
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        maps = [F.normalize(F.adaptive_avg_pool2d(f, size).pow(2).mean(1).flatten(1), dim=1) for f in (s, t)]
        total += float((maps[0] - maps[1]).pow(2).mean())
    return total


def distils(method: float, twin: float, margin: float) -> bool:
    """The check: the method's distance is positive and at most ``1 - margin`` times its twin's."""
    return 0 < method <= (1 - margin) * twin


# ----------------------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one run left: its first student weights and its final student's outputs on the held-out images."""
    start: dict = None
    logits: torch.Tensor = None
    feats: list = None
    heads: list = field(default_factory=list)   # the student's own heads' logits (TOFD, MHKD)


STUDENT_HEADS = {"tofd": "aux", "mhkd": "heads"}


class World:
    """The world's files and the references on its held-out images (the test split, which no run trains on)."""

    def __init__(self, folder):
        self.folder = folder
        data = dataload.load_data("imagefolder", str(folder / "noisy"))
        self.held_out = dataload.normalize(data.test.images, data.info.mean, data.info.std)
        with torch.no_grad():
            self.teacher_logits, self.teacher_feats, _ = load_teacher_file(folder / "teacher.pth")(
                self.held_out, features=True)
            self.dih_heads = dih_heads(head_states(folder / "heads"), self.teacher_feats)


class Lab:
    """Trains the runs of one seed, in process, once each, and measures them against the world's references.
    The caller loads every dataset once (``console.data_loaded_once``)."""

    def __init__(self, world: World, folder, seed: int):
        self.world, self.folder, self.seed = world, folder, seed
        self.outcomes = {}     # (name, variant) -> Outcome
        self.current = None    # the Outcome of the run in progress

    def observe(self, trainer, run) -> dict:
        """``Trainer.run``, keeping the first student weights of the run and the final student's outputs."""
        method = trainer.method
        if self.current.start is None and hasattr(method, "student"):
            self.current.start = {k: v.clone() for k, v in method.student.state_dict().items()}
        record = run(trainer)
        kind = trainer.ctx.cfg.training_type
        if trainer.phase == REGISTRY[kind].final_phase_name:
            method.eval()
            with torch.no_grad():
                self.current.logits, self.current.feats, _ = method.student(self.world.held_out, features=True)
                own = getattr(method, STUDENT_HEADS.get(kind, ""), None) or ()
                self.current.heads = [head(f) for head, f in zip(own, self.current.feats)]
        return record

    def output(self, name: str, variant: str):
        """Where the run ``variant`` of case ``name`` writes."""
        return self.folder / f"{name.replace(' ', '_')}_{variant}" / "m.pth"

    def heads_folder(self, name: str):
        """The teacher's heads case ``name``'s runs learn from: DIH's, or those its method run fine-tuned."""
        kind = CASES[name].type
        return self.world.folder / "heads" if kind == "dih" else default_heads_dir(self.output(name, "method"), kind)

    def argv(self, name: str, variant: str) -> list:
        """The command line of a run: the case's, with its twin's flags, or the KD run at DIH's weights."""
        case = CASES[name]
        kind, flags = case.type, case.flags
        if variant == "kd_at_dih_weights":
            kind, flags = "kd", (*flags, *KD_AT_DIH_WEIGHTS)
        argv = [*STUDENT, "--seed", self.seed, "--data_dir", self.world.folder / "noisy", "--training_type", kind,
                "--saved_path", self.world.folder / "teacher.pth", "--path_to_save", self.output(name, variant), *flags]
        if kind == "dih":
            argv += ["--saved_intermediates_directory", self.world.folder / "heads"]
        if kind in ("tofd", "mhkd") and variant != "method":  # the teacher's heads the method's run fine-tuned
            self.outcome(name, "method")
            argv += [f"--saved_{kind}_directory", self.heads_folder(name)]
        return argv + list(case.twin if variant == "twin" else ())

    def outcome(self, name: str, variant: str = "method") -> Outcome:
        """The run ``variant`` (method, twin, control, teacher_heads, kd_at_dih_weights) of case ``name``."""
        if (name, variant) not in self.outcomes:
            argv = self.argv(name, variant)
            real_run = train_funcs.Trainer.run
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(train_funcs.Trainer, "run", lambda trainer: self.observe(trainer, real_run))
                if variant == "twin":
                    for module, function in CASES[name].zeroed:
                        mp.setattr(module, function, times_zero(getattr(module, function)))
                elif variant == "control":
                    gradient_stopped(mp)
                elif variant == "teacher_heads":
                    teacher_as_heads(mp)
                self.current = Outcome()
                assert run_inprocess(argv) == 0, f"{name} ({variant}): the run failed"
            self.outcomes[(name, variant)] = self.current
        return self.outcomes[(name, variant)]

    def distance(self, name: str, variant: str = "method") -> float:
        """How far the run's student ends from its teacher on the held-out images: the KL divergence of its
        softened outputs from the teacher's (for DIH from each of the teacher and its heads, averaged; with
        ``--logit_std`` both standardised first, as the method compares them); for AT, of the attention maps."""
        case, run = CASES[name], self.outcome(name, variant)
        if case.type == "at":
            return attention_distance(run.feats, self.world.teacher_feats)
        references = [self.world.teacher_logits] + (self.world.dih_heads if case.type == "dih" else [])
        return kl_distance(run.logits, references, "--logit_std" in case.flags)

    def heads_distance(self, name: str, variant: str = "method") -> float:
        """How far the run's student ends from the teacher's heads: for DIH its logits from heads 1..k, for TOFD
        and MHKD each of its own heads from the teacher's head at the same stage (mean KL, held-out images)."""
        kind, run = CASES[name].type, self.outcome(name, variant)
        if kind == "dih":
            return kl_distance(run.logits, self.world.dih_heads)
        with torch.no_grad():
            references = TEACHER_HEADS[kind](head_states(self.heads_folder(name)), self.world.teacher_feats)
        return sum(kl_distance(s, [t]) for s, t in zip(run.heads, references, strict=True)) / len(references)

