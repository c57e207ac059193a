"""The fused op's host path: what an eager call does besides launching (fastvae.kernels).

* eager calls go through ``ReparamKLFunction`` and allocate nothing but their outputs (an int seed
  goes straight to the kernel); ``torch.compile`` traces the custom op instead;
* ``_launch.LaunchCache`` launches through Triton's generic path once per key and directly after
  that, with the call ``JITFunction.run`` makes, and falls back where it cannot;
* the KS helper the GPU statistics tests rely on (``noise_stats.ks_normal``) accepts N(0, 1) and
  rejects what is not.

All of it runs without a GPU: the kernel launch itself is stubbed (``stubbed_launches``) or faked.
"""

import math

import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from fastvae.kernels import _launch
from fastvae.kernels import reparam_kl as rk
from fastvae.kernels import reparameterize_kl
from noise_stats import kolmogorov_sf, ks_normal, tail_probability


class AtenOps(TorchDispatchMode):
    """Records the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def inputs(shape=(4, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in "ab")


# ------------------------------------------------------------------------------------------
# Eager host path
# ------------------------------------------------------------------------------------------


def test_eager_call_allocates_only_its_outputs():
    """Forward: z and kl; backward: dmu and dlogvar. No seed tensor, no reshapes, no copies;
    seed=None draws into a reused buffer (random_, read through a numpy view: reproducible, no
    allocation, one torch op)."""
    mu, logvar = inputs()
    gz, gkl = torch.randn(4, 8), torch.randn(4)
    with rk.stubbed_launches():
        reparameterize_kl(mu, logvar)  # the seed buffer of this thread exists from now on
        with AtenOps() as fwd:
            z, kl = reparameterize_kl(mu, logvar, seed=3)
        with AtenOps() as bwd:
            torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
        with AtenOps() as unseeded:
            reparameterize_kl(mu, logvar)
    assert fwd.ops == ["aten.empty_like.default", "aten.new_empty.default"]
    assert bwd.ops == ["aten.empty_like.default"] * 2
    assert unseeded.ops == ["aten.random_.to"] + fwd.ops
    assert type(z.grad_fn).__name__ == "ReparamKLFunctionBackward"


def test_eager_calls_skip_function_apply_s_python_wrapper_with_the_same_result():
    """This torch has the internals ``_plain_apply`` needs (so a torch that drops them shows
    here); the plain apply gives what ``ReparamKLFunction.apply`` gives, node type included."""
    assert rk._apply is not rk.ReparamKLFunction.apply
    mu, logvar = inputs()
    gz, gkl = torch.randn(4, 8), torch.randn(4)
    got = rk._apply(mu, logvar, 11)
    want = rk.ReparamKLFunction.apply(mu, logvar, 11)
    assert type(got[0].grad_fn) is type(want[0].grad_fn)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = [torch.autograd.grad(out, (mu, logvar), (gz, gkl)) for out in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_under_a_functorch_transform_the_op_behaves_as_function_apply_does():
    """torch.func transforms take Function.apply's own path (this Function defines no
    setup_context, so torch refuses it with its own message) for both entry points."""
    mu, logvar = (t.detach() for t in inputs())

    def loss(apply, m):
        z, kl = apply(m, logvar, 3)
        return z.sum() + kl.sum()

    errors = []
    for apply in (rk._apply, rk.ReparamKLFunction.apply):
        with pytest.raises(RuntimeError, match="setup_context") as info:
            torch.func.grad(lambda m: loss(apply, m))(mu)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_no_autograd_node_when_nothing_needs_grads():
    """Inputs without grads, or under no_grad: the kernel alone, no autograd.Function."""
    mu, logvar = (t.detach() for t in inputs((2, 3, 8)))
    with rk.stubbed_launches():
        z, kl = reparameterize_kl(mu, logvar, seed=1)
        assert z.grad_fn is None and z.shape == (2, 3, 8) and kl.shape == (2, 3)
        with torch.no_grad():
            z, _ = reparameterize_kl(*inputs(), seed=1)
        assert z.grad_fn is None and not z.requires_grad


def test_leading_dims_are_flattened_inside_the_function():
    """(..., D) inputs: views in, views out, one autograd node, grads in the input shape."""
    mu, logvar = inputs((2, 3, 8))
    with rk.stubbed_launches(), AtenOps() as ops:
        z, kl = reparameterize_kl(mu, logvar, seed=1)
        dmu, dlv = torch.autograd.grad((z, kl), (mu, logvar), (torch.ones_like(z), torch.ones_like(kl)))
    assert z.shape == (2, 3, 8) and kl.shape == (2, 3) and dmu.shape == dlv.shape == (2, 3, 8)
    assert not any(op.startswith(("aten.clone", "aten.copy", "aten._to_copy")) for op in ops.ops), ops.ops


def test_launch_plans_are_keyed_by_what_triton_specializes():
    """Same shape, dtype and alignment: one plan. Another batch size, a misaligned view, a
    seed needing 64 bits or a seed pointer: each a plan of its own."""
    with rk.stubbed_launches():
        entries = rk._LAUNCHES.entries
        base = torch.zeros(65, 16)
        mu = base[:64]
        for seed in (1, 2, 3):
            rk._forward_triton(mu, mu, seed)
        assert len(entries) == 1
        rk._forward_triton(base[:32], base[:32], 1)  # another B
        rk._forward_triton(base.view(-1)[1:1025].view(64, 16), mu, 1)  # 4-byte aligned only
        rk._forward_triton(mu, mu, 2**40)  # a 64-bit seed argument
        rk._forward_triton(mu, mu, torch.tensor(5))  # read from a pointer
        assert len(entries) == 5
        assert all(entry.grid == (1,) for entry in entries.values())  # <= 64 x 16: one tile
        flags = [entry.constexprs["SEED_FROM_PTR"] for entry in entries.values()]
        assert flags.count(True) == 1


# ------------------------------------------------------------------------------------------
# LaunchCache
# ------------------------------------------------------------------------------------------


class FakeCompiled:
    """Stands in for triton's CompiledKernel: records the launcher calls."""

    def __init__(self):
        self.function, self.packed_metadata, self.calls = 1234, ("packed",), []

    def run(self, *args):
        self.calls.append(args)


class FakeKernel:
    """Stands in for a @triton.jit function: ``kernel[grid](...)`` records the generic launch."""

    def __init__(self, returns):
        self.returns, self.generic = returns, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.generic.append((grid, args, kwargs))
            return self.returns

        return launch


def plan():
    return (3, 2), {"HAS_X": True, "BLOCK": 64}, 4


@pytest.fixture
def on_device_0(monkeypatch):
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)


def test_first_launch_is_generic_then_direct_with_jit_run_call(on_device_0):
    """The direct call is JITFunction.run's: grid, stream, function, packed metadata, launch
    metadata and hooks (None without hooks), then every argument, constexprs last."""
    compiled = FakeCompiled()
    kernel = FakeKernel(compiled)
    cache = _launch.LaunchCache()
    cache.stream_of = lambda device: 77 + device
    cache.launch(kernel, "key", ("a", 5), plan, 0)
    assert kernel.generic == [((3, 2), ("a", 5), {"HAS_X": True, "BLOCK": 64, "num_warps": 4})]
    assert compiled.calls == []
    cache.launch(kernel, "key", ("b", 6), plan, 0)
    assert len(kernel.generic) == 1  # not through Triton's JIT again
    assert compiled.calls == [(3, 2, 1, 77, 1234, ("packed",), None, None, None, "b", 6, True, 64)]


def test_launch_falls_back_to_the_generic_path(on_device_0, monkeypatch):
    """No CompiledKernel back (the interpreter), or a launch hook set (profilers): every launch
    goes through kernel[grid](...), with the plan worked out once."""
    kernel = FakeKernel(None)
    cache = _launch.LaunchCache()
    calls = []
    for _ in range(3):
        cache.launch(kernel, "k", (1,), lambda: calls.append(1) or plan(), 0)
    assert len(kernel.generic) == 3 and len(calls) == 1

    compiled = FakeCompiled()
    kernel = FakeKernel(compiled)
    cache = _launch.LaunchCache()
    cache.stream_of = lambda device: 0
    cache.launch(kernel, "k", (1,), plan, 0)
    runtime = triton.knobs.runtime
    hook = runtime.launch_enter_hook
    seen = []
    if hasattr(hook, "add"):  # triton >= 3.4: a hook chain
        hook.add(seen.append)
        try:
            cache.launch(kernel, "k", (1,), plan, 0)
        finally:
            hook.remove(seen.append)
    else:
        monkeypatch.setattr(runtime, "launch_enter_hook", seen.append)
        cache.launch(kernel, "k", (1,), plan, 0)
    assert len(kernel.generic) == 2 and compiled.calls == []
    cache.launch(kernel, "k", (1,), plan, 0)  # hook gone: direct again
    assert len(compiled.calls) == 1


def test_direct_launch_supported_by_this_triton():
    """Triton 3.6 (the GPU image) to 3.9 launch with the call LaunchCache replays; another
    version may not (then launches stay generic, and this test says so)."""
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if not (3, 6) <= version <= (3, 9):
        pytest.skip(f"triton {triton.__version__}: direct launches not checked for it")
    assert _launch.direct_launch_supported()


# ------------------------------------------------------------------------------------------
# KS helper
# ------------------------------------------------------------------------------------------


def test_kolmogorov_distribution():
    assert kolmogorov_sf(1.358) == pytest.approx(0.05, abs=1e-3)
    assert kolmogorov_sf(1.628) == pytest.approx(0.01, abs=5e-4)
    assert kolmogorov_sf(0.1) == 1.0 and kolmogorov_sf(5.0) < 1e-20


def test_ks_accepts_normal_samples_and_rejects_others():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g)
    for samples in (x, x.to(torch.bfloat16), x.to(torch.float16)):
        d, p = ks_normal(samples)
        assert p > 1e-3 and d < 2e-3, (samples.dtype, d, p)
    for wrong in (x + 0.01, 1.01 * x, torch.rand(100_000, generator=g) * 6 - 3):
        _, p = ks_normal(wrong)
        assert p < 1e-4, p


def test_tail_probability_of_rounded_normal():
    exact = math.erfc(4 / math.sqrt(2))  # P(|X| > 4)
    assert tail_probability(4.0, torch.float64) == pytest.approx(exact, rel=1e-9)
    # bf16 rounds (4, 4.015625) down to 4: fewer samples exceed it
    assert tail_probability(4.0, torch.bfloat16) == pytest.approx(
        math.erfc((4 + 2**-6) / math.sqrt(2)), rel=1e-9)


def test_host_seeds_are_torch_generator_draws_reproducible_under_manual_seed():
    """draw_host_seed: the values random_(0, 2**31 - 1) draws from the same generator."""
    reference = torch.empty((), dtype=torch.int64)
    torch.manual_seed(7)
    drawn = [rk.draw_host_seed() for _ in range(50)]
    torch.manual_seed(7)
    assert drawn == [int(reference.random_(0, 2**31 - 1)) for _ in range(50)]
    assert len(set(drawn)) == 50 and all(0 <= s < 2**31 - 1 for s in drawn)
    gen = torch.Generator().manual_seed(3)
    own = [rk.draw_host_seed(gen) for _ in range(5)]
    gen.manual_seed(3)
    assert own == [int(reference.random_(0, 2**31 - 1, generator=gen)) for _ in range(5)]


def test_a_first_unseeded_call_under_inference_mode_leaves_later_training_calls_working():
    """The per-thread seed buffer is made outside inference mode whatever mode the first draw
    runs in (an inference tensor would refuse the in-place draws of every later call)."""
    import threading

    errors, results = [], []

    def fresh_thread():  # a new thread: its seed buffer does not exist yet
        try:
            mu = torch.zeros(4, 8)
            with torch.inference_mode():
                rk.draw_host_seed()
                reparameterize_kl(mu, mu)
            leaf = mu.clone().requires_grad_(True)
            z, kl = reparameterize_kl(leaf, leaf)
            (z.sum() + kl.sum()).backward()
            results.append((rk.draw_host_seed(), leaf.grad.shape))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert not errors, errors
    assert results and results[0][1] == (4, 8)


def test_fastvae_kernels_imports_and_runs_without_triton(tmp_path, monkeypatch):
    """triton installs on Linux only: ``import fastvae.kernels`` raised ImportError elsewhere
    (the training path caught it; the public op did not). Without triton the op is the torch
    reference with the same seed contract: the same z and gradients as here, where a CPU
    without TRITON_INTERPRET also takes the reference."""
    import subprocess
    import sys

    from testkit import SUBPROCESS_ENV

    script = f"""
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'triton':
            raise ImportError('no triton here')
sys.meta_path.insert(0, NoTriton())
import torch
from fastvae.kernels import kernel_available, reparameterize_kl
from fastvae.kernels.reparam_kl import HAVE_TRITON
mu = torch.linspace(-1, 1, 24).view(4, 6).requires_grad_(True)
logvar = torch.linspace(-2, 0.5, 24).view(4, 6).requires_grad_(True)
z, kl = reparameterize_kl(mu, logvar, seed=7)
(z.sum() + kl.sum()).backward()
torch.save((HAVE_TRITON, kernel_available(torch.device('cpu'), torch.float32), z.detach(), kl.detach(),
            mu.grad, logvar.grad), {str(tmp_path / "out.pt")!r})
"""
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    have, available, z, kl, gmu, glv = torch.load(tmp_path / "out.pt")
    assert have is False and available is False
    mu = torch.linspace(-1, 1, 24).view(4, 6).requires_grad_(True)
    logvar = torch.linspace(-2, 0.5, 24).view(4, 6).requires_grad_(True)
    monkeypatch.setattr(rk, "_use_kernel", lambda t: False)  # the reference here too (were kernels interpreted)
    z_ref, kl_ref = reparameterize_kl(mu, logvar, seed=7)
    (z_ref.sum() + kl_ref.sum()).backward()
    for got, want in ((z, z_ref), (kl, kl_ref), (gmu, mu.grad), (glv, logvar.grad)):
        torch.testing.assert_close(got, want.detach())
