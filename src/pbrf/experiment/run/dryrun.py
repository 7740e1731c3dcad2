"""``pbrf run --dry-run``: what a run will do and roughly what it will cost, in seconds, before any
work.

Nothing is written. The data are loaded and the config validated as for a real run; then the
model at its initialisation (the costs do not depend on the trained values) is put through each
heavy operation of the run at small sizes, and the measured wall times and peak memories are
extrapolated to the run's sizes: both grow linearly in the rows (stacked models or directions)
and in the examples of a call (:mod:`pbrf.experiment.run.probes` says how the sizes are chosen;
the CNN presets' Newton products stop at two rows over 16 or 32 examples, where the run has 9
rows over 512). Where the engine computes an operation several ways
(:class:`pbrf.newton.Fastest`), each way is probed and the fastest counted. The operations:

* the Newton optimiser of the PBRF and proximal responses (its cost model below): curvature
  products of K rows (``run.chunk_size`` removals, plus the paired no-removal reference) in
  :data:`NEWTON_PRODUCT_DTYPE`, both of ONE shared curvature (the shared model: Gauss–Newton for
  the PBRF, the exact Hessian for the proximal response; one forward pass for all rows) and of
  each row's exact Hessian at its own parameters (the own model; Gauss–Newton with
  ``responses.model = "gn"``), and a float64 value and gradient of each row, over one data chunk
  (``Problem.chunk_size`` examples; a full-data pass is several);
* for a CNN (:func:`pbrf.jacobian.pays`), the shared model's Gauss–Newton products through the
  per-example output Jacobians the engine stores (within :data:`pbrf.jacobian.JACOBIAN_BYTES`):
  their build, probed per example, counted once per start point and chunk, and the two matrix
  products per vector, probed on random Jacobians; the chunks past that memory through the
  network, as above;
* the influence solves' products at θ^s (``influence.curvature``) for as many directions as
  they have right-hand sides (the test points, or K), over one data chunk;
* one vmapped gradient of K stacked models on one minibatch (base training with one model, cold
  and warm start, the LDS retraining);
* the per-example gradients of one data chunk (influence);
* when a solver is ``exact``: the dense damped curvature, counted, not formed (p × p float64
  matrices: :data:`DENSE_MATRICES` at once when it is factorised), and what it is built from,
  probed: the batch Jacobian of one data chunk (Gauss–Newton; its vector-Jacobian products, as
  many as the chunk's outputs, so its memory is quadratic in the chunk) or blocks of
  :data:`DENSE_HESSIAN_BLOCK` Hessian products.

The peak-memory estimate is the process's resident memory after loading and probing (data,
model, torch and the code the operations touch) plus the largest operation at the run's sizes
(the Newton one with the optimiser's state, :data:`NEWTON_VECTORS` ``[K, p]`` float64 vectors,
and the preconditioner's :data:`PRECONDITIONER_PRODUCTS` vectors), or the process's peak while it
loaded the data, if that was higher (a dataset read whole, then cut to the run's size). The
compute estimate multiplies the extrapolated times by the number of such operations, with typical
iteration counts, not the caps: an order of magnitude.

How close the extrapolation comes: the CNN presets' Newton operations are linear in rows ×
examples (ResNet-20 ×0.25, float64 value and gradient: 3.3–3.6 MB per row and example measured
at up to 8 × 64 and 4 × 256, about 3.6 extrapolated from 2 × 16). For small models a call's fixed
costs and the allocator's kept blocks weigh on the small probes, so both time and memory come out
high: LeNet ×0.25's operations at 9–10 rows × 512 examples 2–4 times.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, grad_and_value, jvp, vjp, vmap

from pbrf import Recipe, jacobian, kinds
from pbrf.curvature import CurvatureOperator
from pbrf.engine import stack
from pbrf.experiment import (
    report,  # noqa: F401 - a run imports it matplotlib before it ends: count it
)
from pbrf.experiment.config import ExperimentConfig
from pbrf.experiment.run.inputs import build_problem
from pbrf.experiment.run.probes import Probe, probe, process_peak_bytes, resident_bytes
from pbrf.experiment.run.selection import random_groups
from pbrf.influence import per_example_grads
from pbrf.newton import (
    PRECONDITIONER_BYTES,
    SKETCHES_KEPT,
    hessian_product,
    row_variants,
    variant_names,
)

__all__ = ["dry_run", "format_dry_run", "RunSizes", "NEWTON_OUTER", "NEWTON_SHARED_OUTER",
           "NEWTON_OWN_OUTER", "PCG_ITERS", "CONTINUATION_OUTER", "CONTINUATION_PCG",
           "PROXIMAL_OWN_OUTER", "PROXIMAL_PCG", "KIND_COUNTS",
           "NEWTON_PRODUCT_DTYPE", "PRECONDITIONER_PRODUCTS", "NEWTON_VECTORS", "TYPICAL_CG"]

# The cost model of the Newton optimiser of the PBRF and proximal responses (pbrf.newton): typical
# counts, not the caps, so the estimate is an order of magnitude. Per chunk of K removal rows and
# per kind (KIND_COUNTS): for the PBRF, NEWTON_SHARED_OUTER outer (trust-region) iterations on the
# shared model and NEWTON_OWN_OUTER on each row's own model, each with PCG_ITERS preconditioned-CG
# curvature products (for the proximal rows, PROXIMAL_OWN_OUTER and PROXIMAL_PCG), in
# NEWTON_PRODUCT_DTYPE (the objective, gradient and certificate stay float64), and one float64
# full-data value-and-gradient of every row per outer iteration. The shared model's products
# are of ONE curvature (Gauss–Newton at θ^s for the PBRF, the exact Hessian at the continuation for
# the proximal response) for all K vectors, one forward pass shared; the own model's are each row's
# exact Hessian at its own parameters (K forward passes, batched). PRECONDITIONER_PRODUCTS shared
# Gauss–Newton products build the Nyström preconditioner (once per kind: the engine keeps a sketch
# per start, SKETCHES_KEPT of them, so a run whose chunks alternate PBRF and proximal builds each
# once); it keeps that many [p] vectors. The proximal response's no-removal continuation (one row
# from θ^s, solved once per problem and kind, then shared by every chunk) costs CONTINUATION_OUTER
# outer iterations of CONTINUATION_PCG products each on its own model, or, with the recipe's L-BFGS
# ``warmup``, CONTINUATION_WARMUP evaluations of its float64 value and gradient (at most ``warmup``)
# and then CONTINUATION_WARM_OUTER outer iterations. Measured (smooth LeNet ×0.5 on CIFAR-10, N =
# 500, K = 4, λ = 0.1, θ^s after 30 epochs of SGD; the engine of this version: exact Hessian from
# the start, μ dropped once a step matches its prediction): PBRF 5–8 outer iterations, of which 1–3
# on the shared model and 3–7 on the row's own, 41–97 CG products per removal; the proximal
# continuation, Newton alone, 56 outer iterations and 1,942 CG products to the gradient's round-off
# floor (212 s; negative curvature on the way: an unconverged θ^s; before that floor, 709 s,
# grinding below it), with the L-BFGS warm-up 360 evaluations, then 11 outer iterations and 423 CG
# products (162 s, a different and higher local minimum). mnist-mlp quick, K = 64: 4–7 outer
# iterations and 23–61 CG products for most removals. These counts come from λ = 0.1 and 1e-2
# and underestimate a smaller λ: ResNet-20 ×0.25 on the quick profile's N = 1,000 at λ = 1e-3 (θ^s
# after 5 epochs), one PBRF chunk of 8 removals was still in its 10th outer iteration after 50
# minutes, where this model counts 7 outer iterations, about 17 minutes (the quick profiles now
# use λ = 1e-2). At λ = 1e-2 the same chunk took 23 minutes (1,391 s, 2 idle cores), all 8
# certified (ρ ≤ 3.5e-9): 7–8 outer iterations, 42–76 CG products per removal, the last solves in
# float64 (pbrf.newton.CG_STALL), whose products cost ~4× the float32 ones on a CPU. The proximal
# continuation on that θ^s (5 epochs of SGD, training loss 1.98, λ = 1e-2) is a whole training run:
# 100 Newton iterations (the recipe's cap), 717 CG products, 4 fresh sketches (pbrf.newton._refresh)
# and 1,338 s brought its objective to 0.34 with its gradient still 12× its start, uncertified, and
# every proximal row then starts from there. From a θ^s trained 60 epochs (loss 0.07) its first step
# cut the gradient 2.4-fold, then the exact Hessian met negative curvature and the next two steps,
# in float64, were rejected (395 s). The counts below assume a continuation that converges.
# Re-measured on this version's engine (same LeNet case, 2 threads; a stalled float32 solve whose
# step still cuts the gradient 4-fold keeps float32, pbrf.newton.KEEP_CUT): the continuation 55
# outer iterations and 1,082 float32 products (100 s; before KEEP_CUT 51 and 1,098, of which 248
# in float64, 250 s); the 4 proximal rows, each from the continuation, 27, 26, 7 and 5 outer
# iterations (2 on the shared model each) and 345, 386, 163 and 107 products (114 s): two rows
# descend for 20 iterations with their gradient near 1e6 × its tolerance before Newton's fast
# phase (an unconverged θ^s: the removal moves them along nearly flat directions), 3.6× the PBRF
# rows' count, which the proximal rows had been counted with until then.
#: The smallest damping λ where the counts below were seen to hold (smooth LeNet at 0.1, mnist-mlp
#: at 1e-2); a smaller λ conditions the systems worse (the caveat line says so).
COUNTED_DAMPING = 1e-2
NEWTON_SHARED_OUTER = 2
NEWTON_OWN_OUTER = 5
NEWTON_OUTER = NEWTON_SHARED_OUTER + NEWTON_OWN_OUTER
CONTINUATION_OUTER = 55
CONTINUATION_WARMUP = 400
CONTINUATION_WARM_OUTER = 12
CONTINUATION_PCG = 20
PCG_ITERS = 10
PROXIMAL_OWN_OUTER = 14
PROXIMAL_PCG = 16
#: Per kind: ``(outer iterations on the shared model, on each row's own, CG products per outer
#: iteration)``.
KIND_COUNTS = {"pbrf": (NEWTON_SHARED_OUTER, NEWTON_OWN_OUTER, PCG_ITERS),
               "proximal": (NEWTON_SHARED_OUTER, PROXIMAL_OWN_OUTER, PROXIMAL_PCG)}
NEWTON_PRODUCT_DTYPE = torch.float32
PRECONDITIONER_PRODUCTS = 256
#: Vectors per call of the preconditioner's sketch (``pbrf.newton._preconditioner``'s block).
SKETCH_BLOCK = 16
#: ``[K, p]`` float64 vectors the Newton optimiser keeps per chunk (θ, gradient, CG state, ...).
NEWTON_VECTORS = 12
#: Typical CG iterations of one linear solve of the influence estimate (its practical solver).
TYPICAL_CG = 20
#: p × p float64 matrices alive at once when an exact solve damps and factorises ``C`` (the data
#: curvature, the identity and its multiple, ``C``; then ``C``, its Cholesky factor and a check).
DENSE_MATRICES = 4
#: Hessian products per block when the dense Hessian is built (``pbrf.curvature.dense_hessian``).
DENSE_HESSIAN_BLOCK = 256


@dataclass(frozen=True)
class RunSizes:
    """The sizes of a run that its costs scale with.

    Attributes:
        n, p: training points and parameters.
        per_chunk: removal sets per chunk; ``rows`` adds the paired no-removal reference (the most
            rows optimised together, ``K``); ``n_chunks`` chunks.
        data_chunk: examples per call of a full-data pass (``Problem.chunk_size``, at most ``n``).
        batch, steps: the base recipe's minibatch and steps.
        n_test: test points (right-hand sides of the influence solve).
        outputs: model outputs per example (rows of the Gauss–Newton Jacobian).
        stored_examples: examples whose output Jacobians the Newton engine stores for its shared
            Gauss–Newton products (:mod:`pbrf.jacobian`; 0 where products through the network
            are the cheaper).
    """

    n: int
    p: int
    per_chunk: int
    rows: int
    n_chunks: int
    data_chunk: int
    batch: int
    steps: int
    n_test: int
    outputs: int
    stored_examples: int = 0


def run_sizes(config: ExperimentConfig, problem) -> RunSizes:
    """The :class:`RunSizes` of ``config`` on ``problem`` (θ^s's problem, data loaded)."""
    n, rc = problem.n_train, config.removals
    per_chunk = min(config.run.chunk_size, rc.n_removals)
    paired = config.responses.paired and any(
        "paired" in kinds.get(k).arguments for k in config.responses.ordered_kinds())
    train = Recipe(**config.train.recipe_dict())
    return RunSizes(
        n=n, p=problem.n_params, per_chunk=per_chunk, rows=per_chunk + int(paired),
        n_chunks=math.ceil(rc.n_removals / config.run.chunk_size),
        data_chunk=min(problem.chunk_size, n), batch=min(train.batch_size or n, n),
        steps=train.total_steps(n), n_test=rc.n_test_points,
        outputs=problem.outputs_flat(problem.theta, problem.x[:1])[0].numel(),
        stored_examples=(jacobian.stored_examples(problem, NEWTON_PRODUCT_DTYPE)
                         if jacobian.pays(problem) else 0))


def dry_run(config: ExperimentConfig, inputs) -> dict:
    """Sizes, budgets and the estimated costs of a run (see the module docstring); writes
    nothing.
    """
    started, loading_peak = time.perf_counter(), process_peak_bytes()
    model = inputs.initial_model()
    problem = build_problem(inputs, {k: v.detach() for k, v in model.named_parameters()})
    measure = problem.astype(torch.float64)
    loaded = resident_bytes()
    s = run_sizes(config, problem)
    probes = _probe_all(config, problem, measure, s)
    baseline = resident_bytes()
    stages, state = _memory(config, s, probes)
    newton = max((v for k, v in stages.items() if k.startswith("newton")), default=0)
    peak = max(baseline + max(newton + state, *stages.values()), loading_peak)
    compute = _compute_seconds(config, s, probes)
    rc = config.removals
    if rc.strategy == "random":
        random_groups(config, s.n)  # the choice works (validated again by the run)
    return {
        "name": config.name, "profile": config.profile, "dataset": config.data.name, "n_train": s.n,
        "n_params": s.p, "dtype": config.run.dtype, "device": config.run.device,
        "task": inputs.task_name, "n_test_points": rc.n_test_points, "n_removals": rc.n_removals,
        "group_size": rc.resolved_group_size(s.n), "chunk_size": config.run.chunk_size,
        "n_chunks": s.n_chunks, "kinds": list(config.responses.ordered_kinds()),
        "seeds": config.run.seeds, "train_seed": config.train.seed, "base_steps": s.steps,
        "cold_seeds": list(config.responses.cold_seeds),
        "response_recipe": config.responses.recipe_dict(), "lds_subsets": config.lds.subsets,
        "newton_model": _newton_model(config, s),
        "newton_parts": {k: v * config.run.seeds
                         for k, v in _newton_parts(config, s, probes).items()},
        "loading_peak_bytes": loading_peak, "loaded_rss_bytes": loaded,
        "baseline_rss_bytes": baseline, "probe_peak_bytes": stages,
        "newton_state_bytes": state, "estimated_peak_bytes": peak,
        "probes": {k: v.to_dict() for k, v in probes.items()},
        "probe_seconds": {k: v.seconds(*_run_size(k, s)) for k, v in probes.items()},
        "dry_run_seconds": time.perf_counter() - started,
        "estimated_seconds": compute, "estimated_total_seconds": sum(compute.values()),
    }


def _newton_model(config: ExperimentConfig, s: RunSizes) -> dict | None:
    """The Newton cost model in force (``None`` when no kind is optimised by Newton)."""
    if not _newton_kinds(config) or config.responses.optimizer != "newton":
        return None
    shared = config.responses.model == "shared"
    proximal = "proximal" in _newton_kinds(config)
    return {"outer": NEWTON_OUTER, "stored_examples": s.stored_examples * shared, "n": s.n,
            "damping": config.influence.damping,
            "shared_outer": NEWTON_SHARED_OUTER if shared else 0,
            "pcg": PCG_ITERS, "preconditioner": PRECONDITIONER_PRODUCTS,
            "proximal_outer": proximal * (NEWTON_SHARED_OUTER + PROXIMAL_OWN_OUTER),
            "proximal_pcg": PROXIMAL_PCG,
            "continuation": proximal * math.prod(_continuation_counts(config)[1:]),
            "warmup": proximal * _continuation_counts(config)[0],
            "dtype": str(NEWTON_PRODUCT_DTYPE).removeprefix("torch."),
            "product": "gauss-newton" if config.responses.model == "gn" else "hessian"}


def _continuation_counts(config: ExperimentConfig) -> tuple[int, int, int]:
    """The proximal continuation's typical ``(L-BFGS evaluations, outer iterations, CG products
    per outer iteration)``: Newton alone, or after the recipe's L-BFGS ``warmup``.
    """
    if config.responses.warmup:
        return (min(CONTINUATION_WARMUP, config.responses.warmup), CONTINUATION_WARM_OUTER,
                CONTINUATION_PCG)
    return 0, CONTINUATION_OUTER, CONTINUATION_PCG


def _newton_kinds(config: ExperimentConfig) -> list[str]:
    return [k for k in ("pbrf", "proximal") if k in config.responses.ordered_kinds()]


def _shared_form(kind: str) -> str:
    """The shared curvature of ``kind``'s Newton model: Gauss–Newton at θ^s (PBRF) or the
    exact Hessian at the continuation (proximal).
    """
    return "gn" if kind == "pbrf" else "hessian"


def _kind_rows(config: ExperimentConfig, kind: str, s: RunSizes) -> int:
    """Rows optimised together for ``kind``: the chunk's removals (+ the paired reference)."""
    paired = config.responses.paired and "paired" in kinds.get(kind).arguments
    return s.per_chunk + int(paired)


def _run_size(name: str, s: RunSizes) -> tuple[int, int]:
    """``(rows, examples)`` of one call of a probed operation in the run."""
    sizes = {"training_step": (s.rows, s.batch), "newton_jacobian": (1, s.data_chunk),
             "gauss_newton": (max(s.n_test, s.rows), s.data_chunk),
             "per_example_grads": (1, s.data_chunk),
             "dense_jacobian": (s.data_chunk * s.outputs, s.data_chunk)}
    return sizes.get(name, (s.rows, s.data_chunk))  # the Newton operations


def _probe_all(config: ExperimentConfig, problem, measure, s: RunSizes) -> dict[str, Probe]:
    """Each heavy operation of the run probed up to its size in the run (module docstring)."""
    inf, resp, dev = config.influence, config.responses, problem.device
    ops = {"training_step": _training_step(problem),
           "gauss_newton": _curvature_product(measure, inf.curvature, inf.damping),
           "per_example_grads": _example_grads(measure)}
    if _newton_kinds(config) and resp.optimizer == "newton":
        low = measure.astype(NEWTON_PRODUCT_DTYPE)
        ops["newton_product"] = _own_variants(low, resp.model)
        ops["newton_value_grad"] = {w: _value_grad(measure, w) for w in variant_names(measure)}
        if resp.model == "shared":
            ops |= {f"newton_shared_{form}": _newton_product(low, form, shared=True)
                    for form in {_shared_form(k) for k in _newton_kinds(config)}}
            if s.stored_examples:  # the shared Gauss–Newton products through stored Jacobians
                ops |= {"newton_jacobian": _jacobian_build(low),
                        "newton_jacobian_product": _jacobian_product(low)}
    if "exact" in (inf.solver, inf.accurate_solver) and inf.curvature == "ggn":
        ops["dense_jacobian"] = _jacobian_rows(measure)
    return {k: _fastest(op, *_run_size(k, s), dev) if isinstance(op, dict)
            else probe(op, *_run_size(k, s), dev) for k, op in ops.items()}


def _fastest(variants: dict, rows: int, examples: int, device) -> Probe:
    """The probe of the variant fastest at ``(rows, examples)`` (a loop's memory is that of one
    row at a time). The engine keeps a variant within 2× of the fastest measured at the run's
    sizes, which small probes cannot rank: on ResNet-20 ×0.25 they put ``vmap`` within 2× of the
    loop, which is 4.7× faster at 9 rows × 512 examples (bench/bench_rows.py).
    """
    probes = [dataclasses.replace(probe(op, rows, examples, device), looped=name.startswith("loop"))
              for name, op in variants.items()]
    return min(probes, key=lambda p: p.seconds(rows, examples))


def _memory(config: ExperimentConfig, s: RunSizes, probes: dict[str, Probe]
            ) -> tuple[dict[str, int], int]:
    """Peak bytes above the baseline of each operation at the run's sizes, and the Newton state
    (its ``[K, p]`` vectors and the preconditioner's).
    """
    stages = {k: probes[k].peak_bytes(*_run_size(k, s))
              for k in ("training_step", "gauss_newton", "per_example_grads",
                        "newton_product", "newton_value_grad", "newton_shared_gn",
                        "newton_shared_hessian", "newton_jacobian") if k in probes}
    if _newton_kinds(config) and "newton_product" not in probes:  # first-order PBRF/proximal
        stages["training_step"] = max(stages["training_step"], probes["training_step"].peak_bytes(
            s.rows, _response_recipe(config, s)[1]))
    stages["dense_curvature"] = _dense_bytes(config, s, probes)
    state = 0
    if "newton_product" in probes:
        # a float64 sketch kept per problem and start (pbrf.newton): one per kind, capped
        sketch = min(PRECONDITIONER_PRODUCTS * s.p * 8, PRECONDITIONER_BYTES)
        kept = min(len(_newton_kinds(config)), SKETCHES_KEPT)
        state = NEWTON_VECTORS * s.rows * s.p * 8 + kept * sketch
        if "newton_jacobian" in probes:  # the stored Jacobians (pbrf.jacobian)
            state += s.stored_examples * s.outputs * s.p * NEWTON_PRODUCT_DTYPE.itemsize
    return stages, state


def _dense_bytes(config: ExperimentConfig, s: RunSizes, probes: dict[str, Probe]) -> int:
    """The exact solves' dense ``C``: built chunk by chunk (what it is built from, probed, next to
    the sum so far and one more p × p product), then damped and factorised
    (:data:`DENSE_MATRICES` p × p matrices, counted).
    """
    inf = config.influence
    if "exact" not in (inf.solver, inf.accurate_solver):
        return 0
    matrix = s.p**2 * 8
    if "dense_jacobian" in probes:
        build = probes["dense_jacobian"].peak_bytes(*_run_size("dense_jacobian", s))
    else:
        build = probes["gauss_newton"].peak_bytes(min(DENSE_HESSIAN_BLOCK, s.p), s.data_chunk)
    return max(build + 2 * matrix, DENSE_MATRICES * matrix)


def _response_recipe(config: ExperimentConfig, s: RunSizes) -> tuple[int, int]:
    """``(steps, batch)`` of first-order PBRF / proximal responses."""
    rec = Recipe(**config.responses.recipe_dict())
    return rec.total_steps(s.n), min(rec.batch_size or s.n, s.n)


def _compute_seconds(config: ExperimentConfig, s: RunSizes,
                     probes: dict[str, Probe]) -> dict[str, float]:
    """Estimated seconds per part of the run, from the probes (typical iteration counts), summed
    over the run's θ^s seeds (one whole run each, one after another).
    """
    ordered = config.responses.ordered_kinds()
    step = probes["training_step"]

    def retrain(kind: str, steps: int, batch: int) -> float:
        if kind not in ordered:
            return 0.0
        return s.n_chunks * steps * step.seconds(_kind_rows(config, kind, s), batch)

    lds_rows = min(config.run.chunk_size, config.lds.subsets)
    newton = "Newton" if "newton_product" in probes else "first-order"
    compute = {
        "base training": s.steps * step.seconds(1, s.batch),
        "cold start": len(config.responses.cold_seeds) * retrain("cold", s.steps, s.batch),
        "warm start": retrain("warm", s.steps, s.batch),
        f"PBRF / proximal ({newton})": _newton_seconds(config, s, probes),
        "influence": _influence_seconds(s, probes),
        "LDS": (s.steps * step.seconds(lds_rows, s.batch)
                * math.ceil(config.lds.subsets / config.run.chunk_size)
                * len(config.lds.seeds or config.responses.cold_seeds)),
    }
    return {k: v * config.run.seeds for k, v in compute.items()}


def _newton_seconds(config: ExperimentConfig, s: RunSizes, probes: dict[str, Probe]) -> float:
    """The PBRF and proximal responses: the Newton cost model (module constants) or, with a
    first-order recipe, its steps of K stacked models (the sum of :func:`_newton_parts`).
    """
    return sum(_newton_parts(config, s, probes).values())


def _newton_parts(config: ExperimentConfig, s: RunSizes, probes: dict[str, Probe]
                  ) -> dict[str, float]:
    """:func:`_newton_seconds` in its parts: ``"removals"`` (every chunk's rows, the sketches and
    the stored Jacobians) and, for the proximal response, ``"continuation"`` (one row, solved once
    per run). The paired reference row of a chunk starts at the continuation, solved to its
    round-off floor, and takes no iteration (measured: ``pbrf.respond(..., paired=True)``'s
    reference row, 0 iterations and 0 CG products): it costs its starting gradient only.
    """
    names = _newton_kinds(config)
    if "newton_product" not in probes:
        steps, batch = _response_recipe(config, s)
        return {"removals": sum(s.n_chunks * steps * probes["training_step"].seconds(
            _kind_rows(config, k, s), batch) for k in names)}
    own, value_grad = probes["newton_product"], probes["newton_value_grad"]

    def data_pass(op: Probe, rows: int) -> float:
        return op.pass_seconds(rows, s.n, s.data_chunk)

    def shared_pass(form: str, rows: int) -> float:
        net = probes.get(f"newton_shared_{form}", own)
        if form != "gn" or "newton_jacobian_product" not in probes:
            return data_pass(net, rows)
        stored = s.stored_examples
        return (probes["newton_jacobian_product"].pass_seconds(rows, stored, s.data_chunk)
                + net.pass_seconds(rows, s.n - stored, s.data_chunk))

    def per_kind(kind: str) -> float:
        r = s.per_chunk  # the paired reference: its starting gradient only
        reference = (_kind_rows(config, kind, s) - r) * data_pass(value_grad, 1)
        shared, mine, pcg = KIND_COUNTS[kind]
        gradients = (shared + mine) * data_pass(value_grad, r)
        if f"newton_shared_{_shared_form(kind)}" not in probes:  # only the rows' own models
            return reference + gradients + (shared + mine) * pcg * data_pass(own, r)
        return (reference + gradients + pcg * (shared * shared_pass(_shared_form(kind), r)
                                               + mine * data_pass(own, r)))

    evals, outer, pcg = _continuation_counts(config)
    continuation = ("proximal" in names) * (
        evals * data_pass(value_grad, 1)
        + outer * (pcg * data_pass(own, 1) + data_pass(value_grad, 1)))
    # the Nyström sketch in blocks of SKETCH_BLOCK vectors; the stored Jacobians are rebuilt at
    # each chunk's start point when the kinds' chunks alternate (one point is stored)
    sketch = len(names) * PRECONDITIONER_PRODUCTS / SKETCH_BLOCK * shared_pass("gn", SKETCH_BLOCK)
    builds = 0.0
    if "newton_jacobian" in probes:
        builds = ((1 if len(names) == 1 else s.n_chunks * len(names))
                  * probes["newton_jacobian"].pass_seconds(1, s.stored_examples, s.data_chunk))
    parts = {"removals": s.n_chunks * sum(per_kind(k) for k in names) + sketch + builds}
    return parts | ({"continuation": continuation} if continuation else {})


def _influence_seconds(s: RunSizes, probes: dict[str, Probe]) -> float:
    """Per chunk (as the run does it): the influence solve for the test points and the practical
    solve of the chunk's removals (its output change), :data:`TYPICAL_CG` products each, and the
    gradients of the test and removed points.
    """
    curvature, grads = probes["gauss_newton"], probes["per_example_grads"]
    solves = TYPICAL_CG * (curvature.pass_seconds(s.n_test, s.n, s.data_chunk)
                           + curvature.pass_seconds(s.per_chunk, s.n, s.data_chunk))
    return s.n_chunks * (solves + grads.pass_seconds(1, s.n_test + s.per_chunk, s.data_chunk))


# ---------------------------------------------------------------------------- the operations
def _directions(prob, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ^s stacked ``[rows, p]`` and as many random directions."""
    theta = prob.theta.detach()
    V = torch.randn(rows, theta.numel(), dtype=theta.dtype,
                    generator=torch.Generator().manual_seed(0)).to(theta.device)
    return theta.expand(rows, -1).clone(), V


def _newton_product(prob, model: str, shared: bool = False, way: str | None = None):
    """``op(r, e)``: curvature products of r rows over e examples, as the Newton optimiser computes
    them: exact Hessian or, with ``model = "gn"``, Gauss–Newton; each row at its own parameters
    (the own model) as the engine's variant ``way`` (:func:`pbrf.newton.variant_names`:
    ``"vmap"`` or ``"loop"``, for the Hessian forward or reverse), or, with ``shared``, ONE
    curvature at θ^s for every row's vector (the shared model: the forward pass shared, only the
    tangents batched).
    """

    def op(rows: int, examples: int) -> None:
        x, t = prob.x[:examples], prob.t[:examples]
        theta, V = _directions(prob, rows)

        def loss(th):
            return prob.losses(prob.unflatten(th), x, t).mean()

        def gauss_newton(th, v):
            def f(q):
                return prob.outputs(prob.unflatten(q), x)

            out, jv = jvp(f, (th,), (v,))
            hjv = jvp(grad(lambda o: prob.task.loss(o, t).mean()), (out,), (jv,))[1]
            return vjp(f, th)[1](hjv)[0]

        if shared:
            one = gauss_newton if model == "gn" else hessian_product(loss)
            vmap(one, in_dims=(None, 0))(theta[0], V)
        elif model == "gn":  # the rows' own products, as the engine's variant ``way``
            row_variants(prob, gauss_newton, (0, 0))[way](theta, V)
        else:
            row_variants(prob, loss, (0, 0), hessian=True)[way](theta, V)

    return op


def _jacobian_build(prob):
    """``op(1, e)``: the output Jacobians of e examples at θ^s, as the engine stores them."""

    def op(rows: int, examples: int) -> None:
        jacobian.example_jacobians(prob, prob.theta.detach(), prob.x[:examples])

    return op


def _jacobian_product(prob):
    """``op(r, e)``: shared Gauss–Newton products of r vectors through the stored Jacobians of e
    examples (two matrix products each; the Jacobians, random, are allocated on the first call
    — the warm-up — for up to 64 examples and 256 MiB, and reused in turn for more).
    """
    C, held = jacobian.outputs_per_example(prob), {}
    block = max(1, min(64, 2**28 // (C * prob.n_params * prob.dtype.itemsize)))

    def op(rows: int, examples: int) -> None:
        if "J" not in held:
            held["J"] = torch.randn(block, C, prob.n_params, dtype=prob.dtype, device=prob.device)
            held["H"] = torch.randn(block, C, C, dtype=prob.dtype, device=prob.device)
        _, V = _directions(prob, rows)
        for i in range(0, examples, block):
            n = min(block, examples - i)
            jacobian.gn_product(held["J"][:n], held["H"][:n], V)

    return op


def _own_variants(prob, model: str) -> dict[str, Callable]:
    """The rows' own products in each of the engine's variants (it measures them and keeps one
    within 2× of the fastest at the run's sizes; the dry run counts the fastest probe).
    """
    return {way: _newton_product(prob, model, way=way)
            for way in variant_names(prob, hessian=model != "gn")}


def _value_grad(prob, way: str = "vmap"):
    """``op(r, e)``: the value and gradient of r rows, each at its own parameters, on e examples,
    as the engine's variant ``way``.
    """

    def op(rows: int, examples: int) -> None:
        x, t = prob.x[:examples], prob.t[:examples]
        theta, _ = _directions(prob, rows)
        fn = grad_and_value(lambda th: prob.losses(prob.unflatten(th), x, t).mean())
        row_variants(prob, fn, (0,))[way](theta)

    return op


def _curvature_product(prob, curvature: str, damping: float):
    """``op(r, e)``: the damped curvature at θ^s times r directions, on e examples."""
    operator = CurvatureOperator(prob, curvature, damping)

    def op(rows: int, examples: int) -> None:
        operator.matvec(_directions(prob, rows)[1], index=torch.arange(examples,
                                                                         device=prob.device))

    return op


def _training_step(prob):
    """``op(r, e)``: one gradient of r stacked copies of the model on e examples (vmap, as the
    engine).
    """

    def op(rows: int, examples: int) -> None:
        x, t = prob.x[:examples], prob.t[:examples]
        vmap(grad(lambda params: prob.losses(params, x, t).mean()))(stack(prob.params, rows))

    return op


def _example_grads(prob):
    """``op(_, e)``: the per-example gradients of e examples."""

    def op(rows: int, examples: int) -> None:
        per_example_grads(prob, prob.x[:examples], prob.t[:examples])

    return op


def _jacobian_rows(prob):
    """``op(r, e)``: r vector-Jacobian products of the outputs of e examples — the batch
    Jacobian of a data chunk, from which the dense Gauss–Newton matrix is built, is ``e ·
    outputs`` of them.
    """

    def op(rows: int, examples: int) -> None:
        x = prob.x[:examples]
        out, pullback = vjp(lambda q: prob.outputs_flat(q, x), prob.theta.detach())
        U = torch.randn(rows, *out.shape, dtype=out.dtype,
                        generator=torch.Generator().manual_seed(1)).to(out.device)
        vmap(lambda u: pullback(u)[0])(U)

    return op


# ---------------------------------------------------------------------------- the text
def format_dry_run(d: dict) -> str:
    """The dry run as text for the terminal."""
    lines = [
        f"dry run of {d['name']} ({d['profile']}): nothing computed, nothing written",
        f"  data      {d['dataset']}: N = {d['n_train']:,} training points, task {d['task']}",
        f"  model     {d['n_params']:,} parameters, {d['dtype']} on {d['device']}",
        f"  work      {d['n_test_points']} test points x {d['n_removals']} removal sets of "
        f"{d['group_size']} point(s), in {d['n_chunks']} chunk(s) of {d['chunk_size']}",
        f"  kinds     {', '.join(d['kinds'])}",
        *([f"  seeds     {d['seeds']} base models θ^s (train.seed {d['train_seed']}.."
           f"{d['train_seed'] + d['seeds'] - 1}), each a whole run, one after another: "
           "the compute below is their total, the memory that of one"] if d.get("seeds", 1) > 1
          else []),
        f"  budgets   base training {d['base_steps']:,} steps; cold-start seeds {d['cold_seeds']}; "
        f"PBRF/proximal recipe {d['response_recipe']}; LDS subsets {d['lds_subsets']}",
        _memory_line(d),
        f"  compute   roughly {_duration(d['estimated_total_seconds'])} at this machine's speed:",
    ]
    lines += [f"              {k}: {_duration(v)}{_parts(k, d)}"
              for k, v in d["estimated_seconds"].items() if v]
    lines += _caveat(d)
    return "\n".join(lines)


def _parts(key: str, d: dict) -> str:
    """The PBRF / proximal line's parts, where the proximal continuation is one of them."""
    parts = d.get("newton_parts") or {}
    if not key.startswith("PBRF") or "continuation" not in parts:
        return ""
    return (f" ({_duration(parts['removals'])} the removals, "
            f"{_duration(parts['continuation'])} the proximal continuation)")


def _memory_line(d: dict) -> str:
    """The peak-memory estimate and its parts."""
    gib = 2**30
    stages = d["probe_peak_bytes"]
    largest = max(stages, key=stages.get)
    parts = (f"the process after loading and probing {d['baseline_rss_bytes'] / gib:.2f} GiB + the "
             f"largest operation at the run's sizes, {largest}, {stages[largest] / gib:.2f} GiB")
    if d["newton_state_bytes"]:
        parts += f" + Newton state {d['newton_state_bytes'] / gib:.2f} GiB"
    if d["loading_peak_bytes"] >= d["estimated_peak_bytes"]:
        parts = f"reached while loading the data; then {parts}"
    return f"  memory    about {d['estimated_peak_bytes'] / gib:.2f} GiB peak resident ({parts})"


def _caveat(d: dict) -> list[str]:
    """The lines that say how rough the estimate is and where it comes from."""
    most = max((p["rows"] * p["examples"], p["rows"], p["examples"])
               for probe_ in d["probes"].values() for p in probe_["points"])
    lines = [f"  estimate  an order of magnitude: extrapolated from probes at small sizes (at most "
             f"{most[1]} row(s) x {most[2]} example(s); {d['dry_run_seconds']:.0f} s for this "
             "dry run), with typical iteration counts, not the caps"]
    m = d.get("newton_model")
    if m:
        own = m["outer"] - m.get("shared_outer", 0)
        where = (f" ({m['shared_outer']} on the shared curvature, one forward pass for all rows; "
                 f"{own} on each row's own {m['product']})" if m.get("shared_outer")
                 else f" on each row's own {m['product']}")
        proximal = (f"; {m['proximal_outer']} per proximal removal, each {m['proximal_pcg']} "
                    "products" if m.get("proximal_outer") else "")
        lines.append(f"            Newton: {m['outer']} outer iterations per PBRF removal{where}, "
                     f"each {m['pcg']} {m['dtype']} products and one float64 gradient over the "
                     f"data{proximal}; {m['preconditioner']} preconditioner products per kind"
                     + ("; the proximal continuation "
                        + (f"{m['warmup']} L-BFGS gradients and " if m.get("warmup") else "")
                        + f"{m['continuation']} products of one row"
                        if m.get("continuation") else "")
                     + (f"; shared Gauss–Newton products through the stored Jacobians of "
                        f"{m['stored_examples']:,} of {m['n']:,} examples"
                        if m.get("stored_examples") else ""))
        if m.get("damping", COUNTED_DAMPING) < COUNTED_DAMPING:
            lines.append(f"            these counts hold at λ ≥ {COUNTED_DAMPING:g}; at λ = "
                         f"{m['damping']:g} expect more (ResNet-20 ×0.25 at 1e-3: at least 3× the "
                         "counted time for a PBRF chunk)")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

