# pyre-strict
"""Our DistributedShampoo against the reference implementation, step by step, in float64.

Runs both optimizers, each in its own process (the two packages share the import name
``distributed_shampoo``), on the same model, data and full-batch loss for ``--steps`` steps, for
every option both implement, and reports the largest parameter difference relative to how far
the parameters moved. The reference's own float32-vs-float64 gap, from a third run, is the
yardstick: a difference well below it is rounding.

    python -m benchmarks.compare_reference --reference /path/to/optimizers   # a checkout at 18178f4

The reference is not a dependency: the checkout is put on ``PYTHONPATH`` of its process only.
This file imports nothing of ours at module level, since it also runs inside the reference's
process.
"""

import argparse
import importlib
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

# Each case: the constructor's hyperparameters shared by both implementations, the grafting
# (name, options), the distributed config's options, the torch.compile options, the preconditioner
# config's options, and whether one parameter has no gradient on every other step.
CASES: dict[str, dict[str, object]] = {
    "plain": {},
    "beta2 EMA, bias-corrected": {"betas": (0.0, 0.95)},
    "beta1, bias-corrected": {"betas": (0.9, 1.0)},
    "beta1, no bias correction": {"betas": (0.9, 0.99), "use_bias_correction": False},
    "beta3 (NAdam-like)": {"betas": (0.9, 1.0), "beta3": 0.81},
    "SGD grafting": {"grafting": ("sgd", {})},
    "AdaGrad grafting": {"grafting": ("adagrad", {"epsilon": 1e-3})},
    "RMSprop grafting": {"grafting": ("rmsprop", {"beta2": 0.9, "epsilon": 1e-3})},
    "Adam grafting": {"grafting": ("adam", {"beta2": 0.9, "epsilon": 1e-3}), "betas": (0.9, 0.99)},
    "momentum": {"momentum": 0.9},
    "momentum, dampening": {"momentum": 0.9, "dampening": 0.3},
    "Nesterov": {"momentum": 0.9, "use_nesterov": True},
    "Nesterov, dampening": {"momentum": 0.9, "dampening": 0.3, "use_nesterov": True},
    "decoupled weight decay": {"weight_decay": 0.01},
    "L2 weight decay": {"weight_decay": 0.01, "use_decoupled_weight_decay": False},
    "frequency 5, start 7": {"precondition_frequency": 5, "start_preconditioning_step": 7},
    "frequency 5, start 7, Adam grafting": {
        "precondition_frequency": 5, "start_preconditioning_step": 7, "grafting": ("adam", {"beta2": 0.9, "epsilon": 1e-3}),
    },
    "a gradient missing every other step": {"betas": (0.9, 0.99), "skip_grad": True},
    "no blocking (math.inf), merged to vectors": {"max_preconditioner_dim": math.inf},
    "no blocking (math.inf), matrices kept": {"max_preconditioner_dim": math.inf, "distributed": {"target_parameter_dimensionality": 2}},
    "compiled step (dynamo, eager backend)": {"betas": (0.9, 0.99), "compile": {"backend": "eager"}},
    "inverse_exponent_override {2: 0.2, 1: 0.25}": {"preconditioner": {"inverse_exponent_override": {2: 0.2, 1: 0.25}}},
    "coupled Newton roots": {"betas": (0.0, 0.95), "preconditioner": {"newton": True}},
    "coupled higher-order roots (order 3), abs_epsilon 1e-6": {"betas": (0.0, 0.95), "preconditioner": {"higher_order": True}},
    "epsilon added after eigh": {"betas": (0.0, 0.95), "preconditioner": {"perturb_before_computation": False}},
    "pseudo-inverse roots, epsilon 0": {"betas": (0.0, 0.95), "epsilon": 0.0, "preconditioner": {"pseudo_inverse": True}},
    "eigendecomposed Shampoo": {"preconditioner": {"kind": "EigendecomposedShampoo"}},
    "eigendecomposed, pseudo-inverse (rank_rtol None), epsilon 0": {
        "epsilon": 0.0, "preconditioner": {"kind": "EigendecomposedShampoo", "pseudo_inverse": True},
    },
    "eigendecomposed, beta2 EMA, Adam grafting": {
        "betas": (0.9, 0.95), "grafting": ("adam", {"beta2": 0.9, "epsilon": 1e-3}), "preconditioner": {"kind": "EigendecomposedShampoo"},
    },
    "SOAP (eigh), beta2 EMA": {"betas": (0.9, 0.95), "preconditioner": {"kind": "EigenvalueCorrectedShampoo"}},
    "SOAP (eigh), beta2 EMA, no bias correction": {
        "betas": (0.9, 0.95), "use_bias_correction": False, "preconditioner": {"kind": "EigenvalueCorrectedShampoo"},
    },
    "SOAP (one QR step), frequency 3, Adam grafting": {
        "betas": (0.9, 0.95), "precondition_frequency": 3, "grafting": ("adam", {"beta2": 0.9, "epsilon": 1e-3}),
        "preconditioner": {"kind": "EigenvalueCorrectedShampoo", "qr": True},
    },
    "SOAP, ignored_basis_change_dims {2: [1]}, exponent 1/4": {
        "betas": (0.0, 0.95), "preconditioner": {"kind": "EigenvalueCorrectedShampoo", "ignored_basis_change_dims": {2: [1]}, "inverse_exponent_override": {2: 0.25}},
    },
    "sign descent": {"betas": (0.9, 0.99), "preconditioner": {"kind": "SignDescent"}},
    "sign descent, scaled by the L1 norm, momentum": {"momentum": 0.5, "preconditioner": {"kind": "SignDescent", "l1_scale": True}},
    "spectral descent (Newton-Schulz), no biases": {
        "betas": (0.9, 0.99), "max_preconditioner_dim": math.inf, "no_bias": True, "preconditioner": {"kind": "SpectralDescent"},
    },
    "spectral descent (SVD), Adam grafting, no biases": {
        "max_preconditioner_dim": math.inf, "no_bias": True, "grafting": ("adam", {"beta2": 0.9, "epsilon": 1e-3}),
        "preconditioner": {"kind": "SpectralDescent", "svd": True},
    },
}


def _l1_norm(grad: torch.Tensor) -> torch.Tensor:
    return grad.abs().sum()


def _model(dtype: torch.dtype, bias: bool = True) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=bias), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=bias)).to(dtype)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 6, generator=generator, dtype=torch.float64).to(dtype)
    targets = torch.randn(16, 3, generator=generator, dtype=torch.float64).to(dtype)
    return model, inputs, targets


def _package() -> ModuleType:
    """Whichever ``distributed_shampoo`` this process imports: ours or the reference (so its
    attributes are looked up by name)."""
    return importlib.import_module("distributed_shampoo")


def _grafting(spec: object) -> object:
    """The grafting config of this process's ``distributed_shampoo``."""
    package = _package()
    if spec is None:
        return None
    assert isinstance(spec, tuple)
    name, options = spec
    reference = hasattr(package, "AdamGraftingConfig")
    classes = {
        "sgd": "SGDGraftingConfig" if reference else "SGDPreconditionerConfig",
        "adagrad": "AdaGradGraftingConfig" if reference else "AdaGradPreconditionerConfig",
        "rmsprop": "RMSpropGraftingConfig" if reference else "RMSpropPreconditionerConfig",
        "adam": "AdamGraftingConfig" if reference else "AdamPreconditionerConfig",
    }
    return getattr(package, classes[name])(**options)


def _build(case: str, dtype: torch.dtype) -> tuple[torch.optim.Optimizer, torch.nn.Module, torch.Tensor, torch.Tensor, bool]:
    """The optimizer of ``case`` from this process's ``distributed_shampoo``, its model, data, and
    whether a gradient goes missing every other step."""
    package = _package()
    options = dict(CASES[case])
    grafting = _grafting(options.pop("grafting", None))
    skip_grad = bool(options.pop("skip_grad", False))
    distributed = options.pop("distributed", None)
    if distributed is not None:
        types = importlib.import_module("distributed_shampoo.shampoo_types")  # the reference exports it there only
        options["distributed_config"] = types.SingleDeviceDistributedConfig(**distributed)
    compile_options = options.pop("compile", None)
    if compile_options is not None:
        options["shampoo_pt2_compile_config"] = package.ShampooPT2CompileConfig(**compile_options)
    model, inputs, targets = _model(dtype, bias=not options.pop("no_bias", False))
    # Factors in the parameters' dtype on both sides (the default is float32); roots are too.
    preconditioner_options = options.pop("preconditioner", {})
    assert isinstance(preconditioner_options, dict)
    preconditioner = dict(preconditioner_options)
    kind = preconditioner.pop("kind", "RootInvShampoo")
    if preconditioner.pop("perturb_before_computation", True) is False:
        perturbation = package.PerturbationConfig(perturb_before_computation=False)
        preconditioner["amortized_computation_config"] = package.EigenConfig(rank_deficient_stability_config=perturbation)
    if preconditioner.pop("pseudo_inverse", False):
        # rank_rtol 0 (the default) for the roots, None (n times the dtype's epsilon) for the eigendecomposed.
        if kind == "RootInvShampoo":
            preconditioner["amortized_computation_config"] = package.EigenConfig(rank_deficient_stability_config=package.PseudoInverseConfig())
        else:
            stability = package.PseudoInverseConfig(rank_rtol=None)
            preconditioner["amortized_computation_config"] = package.EighEigendecompositionConfig(rank_deficient_stability_config=stability)
    if preconditioner.pop("l1_scale", False):
        preconditioner["scale_fn"] = _l1_norm
    if preconditioner.pop("newton", False):
        preconditioner["amortized_computation_config"] = package.CoupledNewtonConfig()
    if preconditioner.pop("higher_order", False):
        preconditioner["amortized_computation_config"] = package.CoupledHigherOrderConfig(rel_epsilon=0.0, abs_epsilon=1e-6)
    if preconditioner.pop("qr", False):
        preconditioner["amortized_computation_config"] = package.QREigendecompositionConfig()
    if preconditioner.pop("svd", False):
        preconditioner["orthogonalization_config"] = package.SVDOrthogonalizationConfig()
    if "Shampoo" in kind:
        preconditioner["factor_matrix_dtype"] = dtype
    options["preconditioner_config"] = getattr(package, f"{kind}PreconditionerConfig")(**preconditioner)
    options = {"max_preconditioner_dim": 4, "epsilon": 1e-6, **options}
    optimizer = package.DistributedShampoo(model.parameters(), lr=0.05, grafting_config=grafting, **options)
    return optimizer, model, inputs, targets, skip_grad


def worker(case: str, dtype_name: str, steps: int, out: str) -> None:
    """Runs one case with the ``distributed_shampoo`` on this process's path; saves every step's parameters."""
    torch.set_num_threads(1)
    optimizer, model, inputs, targets, skip_grad = _build(case, getattr(torch, dtype_name))
    trajectory = [_flat_parameters(model)]
    for step in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        if skip_grad and step % 2 == 1:
            model[2].bias.grad = None
        optimizer.step()
        trajectory.append(_flat_parameters(model))
    torch.save(torch.stack(trajectory), out)


# The resume checks: one implementation saves its distributed_state_dict after RESUME_AT steps
# (torch.save, as a user of the reference would), the other loads it and takes the remaining
# steps; compared with the saver's own uninterrupted run. One case per preconditioner kind.
# Each case: whether the state dict holds the param_groups. Not for sign and spectral descent: the
# reference's default scale_fn and scale_by_dims_fn are lambdas, which torch.save cannot pickle.
RESUME_AT = 5
RESUME_CASES: dict[str, bool] = {
    "Adam grafting": True,
    "eigendecomposed, beta2 EMA, Adam grafting": True,
    "SOAP (one QR step), frequency 3, Adam grafting": True,
    "sign descent": False,
    "spectral descent (SVD), Adam grafting, no biases": False,
}


def _advance(optimizer: torch.optim.Optimizer, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().clone()


def resume_worker(case: str, role: str, steps: int, prefix: str) -> None:
    """``save``: this process's run of ``case`` and its state dict at ``RESUME_AT``; ``resume``:
    the run from that state dict. Either writes its first and last parameters."""
    torch.set_num_threads(1)
    optimizer, model, inputs, targets, _ = _build(case, torch.float64)
    result = {"initial": _flat_parameters(model)}
    if role == "save":
        _advance(optimizer, model, inputs, targets, RESUME_AT)
        state_dict = optimizer.distributed_state_dict(model.named_parameters(), RESUME_CASES[case])  # pyre-ignore[16]: both have it
        torch.save({"model": model.state_dict(), "optimizer": state_dict}, f"{prefix}.at")
    else:
        saved = torch.load(f"{prefix}.at", weights_only=False)  # the other's configs, by their (shared) class names
        model.load_state_dict(saved["model"])
        optimizer.load_distributed_state_dict(saved["optimizer"], model.named_parameters(), RESUME_CASES[case])  # pyre-ignore[16]
    _advance(optimizer, model, inputs, targets, steps - RESUME_AT)
    result["final"] = _flat_parameters(model)
    torch.save(result, f"{prefix}.{role}")


def _resume_gap(case: str, steps: int, saver: str, resumer: str, prefix: str) -> float:
    """How far the resumed run ends from the saver's own, relative to how far that one moved."""
    _in_process(saver, "--resume-worker", case, "save", str(steps), prefix)
    _in_process(resumer, "--resume-worker", case, "resume", str(steps), prefix)
    saved, resumed = torch.load(f"{prefix}.save"), torch.load(f"{prefix}.resume")
    return float((resumed["final"] - saved["final"]).abs().max()) / float((saved["final"] - saved["initial"]).abs().max())


def _in_process(path: str, *arguments: str) -> None:
    """Runs this file with ``arguments`` in a process whose ``distributed_shampoo`` is ``path``'s."""
    command = [sys.executable, __file__, *arguments]
    subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, check=True, capture_output=True)


def _run(case: str, dtype: str, steps: int, path: str, out: Path) -> torch.Tensor:
    _in_process(path, "--worker", case, dtype, str(steps), str(out))
    return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="a checkout of facebookresearch/optimizers at 18178f4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resumes-only", action="store_true", help="only the resume checks")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--resume-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, dtype, steps, out = args.worker
        worker(case, dtype, int(steps), out)
        return
    if args.resume_worker:
        case, role, steps, prefix = args.resume_worker
        resume_worker(case, role, int(steps), prefix)
        return
    ours = str(Path(__file__).resolve().parents[1])
    print(f"{args.steps} steps, lr 0.05, epsilon 1e-6, blocks of at most 4, an MLP 6-5-3 (53 parameters), float64")
    print("| case | ours vs reference (float64) | reference float32 vs float64 | ratio |\n|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for case in () if args.resumes_only else CASES:
            reference = _run(case, "float64", args.steps, args.reference, Path(scratch, "reference.pt"))
            reference32 = _run(case, "float32", args.steps, args.reference, Path(scratch, "reference32.pt"))
            mine = _run(case, "float64", args.steps, ours, Path(scratch, "ours.pt"))
            moved = float((reference - reference[0]).abs().max())
            gap = float((mine - reference).abs().max()) / moved
            yardstick = float((reference32 - reference).abs().max()) / moved
            print(f"| {case} | {gap:.2e} | {yardstick:.2e} | {gap / yardstick:.3f} |", flush=True)
        print(
            f"\nResumes: the saver's distributed_state_dict after {RESUME_AT} of {args.steps} steps, torch.save'd, "
            "loaded by the other implementation, which takes the remaining steps: how far it ends from the saver's own run, "
            "relative to how far that moved"
        )
        print("| case | reference's state dict into ours | ours into the reference |\n|---|---:|---:|")
        prefix = str(Path(scratch, "resume"))
        for case in RESUME_CASES:
            into_ours = _resume_gap(case, args.steps, args.reference, ours, prefix)
            into_reference = _resume_gap(case, args.steps, ours, args.reference, prefix)
            groups = "" if RESUME_CASES[case] else " (save_param_groups=False)"
            print(f"| {case}{groups} | {into_ours:.2e} | {into_reference:.2e} |", flush=True)


if __name__ == "__main__":
    main()
