"""GPU smoke run of the moelora._C CUDA ops, one call at a time (not collected by pytest).

    python tests/gpu_smoke_ext.py            # every case
    python tests/gpu_smoke_ext.py router     # only cases whose name contains "router"

Each case prints its name (flushed) before the call and "ok" after a device synchronize, so
a host segfault or a device fault points at the last name printed. faulthandler is on;
run with CUDA_LAUNCH_BLOCKING=1 to pin asynchronous device errors to their launch. Results
are compared with the C++ CPU kernels (integer outputs exactly, floats to rounding).
"""

import faulthandler
import sys

import torch

faulthandler.enable(all_threads=True)


def say(msg):
    print(msg, flush=True)


def main(pattern=""):
    from moelora.ops import native as _ext

    say(f"torch {torch.__version__}, cuda {torch.version.cuda}, HAS_C={_ext.HAS_C}, WITH_CUDA={_ext.WITH_CUDA}")
    if not (torch.cuda.is_available() and _ext.has_cuda_kernels()):
        say("SKIP: needs a GPU and moelora._C built with CUDA kernels")
        return 0
    ops = torch.ops.moelora
    say(f"device {torch.cuda.get_device_name()}")
    torch.cuda.init()
    gen = torch.Generator().manual_seed(0)
    failures = []

    def case(name, fn):
        if pattern not in name:
            return
        say(f"-> {name}")
        try:
            fn()
            torch.cuda.synchronize()
            say("   ok")
        except Exception as exc:  # noqa: BLE001  (keep going: report every failing case)
            failures.append(name)
            say(f"   FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def same(a, b, name, exact=False, tol=1e-5):
        a = a.cpu()
        if exact:
            assert torch.equal(a, b), f"{name} differs from the CPU kernel"
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"{name} differs from the CPU kernel")

    # ---- router_topk
    def router(T, E, k, mode, renorm, dtype):
        def run():
            logits = (torch.randn(T, E, generator=gen) * 2).to(dtype)
            got = ops.router_topk(logits.cuda(), k, mode, renorm)
            want = ops.router_topk(logits, k, mode, renorm)
            for i, n in enumerate(("weights", "ids", "counts", "prob_sums", "lse")):
                same(got[i], want[i], n, exact=n in ("ids", "counts"), tol=1e-4 if n == "prob_sums" else 1e-5)
        return run

    for T, E, k, mode, renorm, dtype in [
        (5, 4, 2, 0, False, torch.float32), (5, 4, 2, 1, False, torch.float32),
        (7, 6, 3, 0, True, torch.bfloat16), (7, 6, 3, 0, True, torch.float16),
        (7, 6, 3, 0, True, torch.float64), (0, 8, 2, 0, False, torch.float32),
        (33, 4096, 4, 0, False, torch.bfloat16),  # 48 KiB of dynamic shared memory
        (9, 2500, 3, 0, True, torch.float64),  # > 48 KiB: opt-in via cudaFuncSetAttribute
        (4099, 8, 2, 1, False, torch.float32),
    ]:
        case(f"router_topk T={T} E={E} k={k} mode={mode} renorm={renorm} {dtype}",
             router(T, E, k, mode, renorm, dtype))

    # ---- dispatch_metadata
    def metadata(T, E, k, bs, id_dtype):
        def run():
            ids = torch.randint(0, E, (T, k), generator=gen).to(id_dtype)
            if T > 10:
                ids[5, 0], ids[9, k - 1] = -3, E  # invalid ids: left out
            got = ops.dispatch_metadata(ids.cuda(), E, bs)
            want = ops.dispatch_metadata(ids, E, bs)
            assert len(got) == 8, len(got)
            for i, (g, w) in enumerate(zip(got, want)):
                same(g, w, f"output {i}", exact=True)
        return run

    for T, E, k, bs, idt in [(4, 3, 2, 0, torch.int32), (4, 3, 2, 4, torch.int64), (0, 8, 2, 0, torch.int32),
                             (0, 8, 2, 16, torch.int64), (1, 1, 1, 1, torch.int32), (50, 8, 2, 4, torch.int32),
                             (700, 4096, 3, 64, torch.int32), (3001, 257, 4, 0, torch.int64),
                             (65536, 64, 2, 64, torch.int32)]:
        case(f"dispatch_metadata T={T} E={E} k={k} bs={bs} {idt}", metadata(T, E, k, bs, idt))

    # ---- dispatch / combine / pair_dot on one small layout
    T, E, k = 6, 4, 2
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    for bs in (0, 4):
        meta_c = ops.dispatch_metadata(ids, E, bs)
        sp_c, inv_c = (meta_c[2], meta_c[3]) if bs == 0 else (meta_c[5], meta_c[6])
        sp_g, inv_g = sp_c.cuda(), inv_c.cuda()
        P = sp_c.shape[0]
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for d in (8, 5):  # 8 floats: 16-byte rows (vector copy); 5: element copy
                x = torch.randn(T, d, generator=gen).to(dtype)
                y = torch.randn(P, d, generator=gen).to(dtype)
                w = torch.rand(T, k, generator=gen)
                tag = f"bs={bs} {dtype} d={d}"
                case(f"dispatch (no weights) {tag}",
                     lambda: same(ops.dispatch(x.cuda(), sp_g, inv_g, None), ops.dispatch(x, sp_c, inv_c, None),
                                  "dispatch", exact=True))
                case(f"dispatch (weights) {tag}",
                     lambda: same(ops.dispatch(x.cuda(), sp_g, inv_g, w.cuda()), ops.dispatch(x, sp_c, inv_c, w),
                                  "dispatch", tol=1e-2))
                case(f"combine (no weights) {tag}",
                     lambda: same(ops.combine(y.cuda(), sp_g, inv_g, None), ops.combine(y, sp_c, inv_c, None),
                                  "combine", tol=1e-2))
                case(f"combine (weights) {tag}",
                     lambda: same(ops.combine(y.cuda(), sp_g, inv_g, w.cuda()), ops.combine(y, sp_c, inv_c, w),
                                  "combine", tol=1e-2))
                case(f"pair_dot {tag}",
                     lambda: same(ops.pair_dot(x.cuda(), y.cuda(), sp_g, inv_g), ops.pair_dot(x, y, sp_c, inv_c),
                                  "pair_dot", tol=1e-2))

    # ---- empty inputs and argument errors (must raise, never crash)
    def empty_gathers():
        sp = torch.empty(0, dtype=torch.long, device="cuda")
        inv = torch.empty(0, 2, dtype=torch.long, device="cuda")
        x = torch.empty(0, 3, device="cuda")
        assert ops.dispatch(x, sp, inv, None).shape == (0, 3)
        assert ops.combine(x, sp, inv, None).shape == (0, 3)
        assert ops.pair_dot(x, x, sp, inv).shape == (0, 2)

    case("dispatch/combine/pair_dot on empty inputs", empty_gathers)

    def mixed_devices():
        sp = torch.zeros(2, dtype=torch.long)
        inv = torch.zeros(1, 2, dtype=torch.long)
        for fn in (lambda: ops.dispatch(torch.randn(1, 3, device="cuda"), sp, inv, None),
                   lambda: ops.combine(torch.randn(2, 3), sp.cuda(), inv.cuda(), None),
                   lambda: ops.pair_dot(torch.randn(1, 3), torch.randn(2, 3, device="cuda"), sp.cuda(), inv.cuda())):
            try:
                fn()
            except (ValueError, RuntimeError):
                continue
            raise AssertionError("mixed CPU/CUDA arguments were accepted")

    case("mixed CPU/CUDA arguments raise", mixed_devices)

    # ---- autograd through the CUDA ops (backward runs combine/dispatch/pair_dot on the autograd thread)
    def backward():
        import moelora

        meta = moelora.dispatch_metadata(ids.cuda(), E, block_size=4)
        x = torch.randn(T, 5, dtype=torch.float64, device="cuda", requires_grad=True)
        w = torch.rand(T, k, dtype=torch.float64, device="cuda", requires_grad=True)
        moelora.combine(moelora.dispatch(x, meta) * 2, meta, w).sum().backward()
        logits = torch.randn(T, E, dtype=torch.float64, device="cuda", requires_grad=True)
        r = moelora.route(logits, 2, renormalize=True)
        (r.weights.sum() + r.prob_sums.sum() + r.lse.sum()).backward()

    case("autograd through route/dispatch/combine", backward)

    say(f"done: {len(failures)} failure(s)" + (": " + "; ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
