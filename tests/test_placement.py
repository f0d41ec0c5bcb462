"""The placement planner on given sizes, and every plan giving the same masks and weights."""
import pytest
import torch

from conftest import tiny_model
from prunekit import PruneConfig, PrunekitError, prune
from prunekit.adapters import adapter_for
from prunekit.execution.placement import GiB, Sizes, device_need, plan_placement, plan_storage

# LLaMA-2-7B in bf16 with 128 x 2048 calibration tokens
SEVEN_B = dict(weights=int(12.3 * GiB), shell=int(0.5 * GiB), block=int(0.38 * GiB), activations=2 * GiB,
               batch_activations=2 * GiB // 16, work=int(0.6 * GiB), host_free=100 * GiB, storage_dtype="bfloat16")


def sizes(**kw) -> Sizes:
    return Sizes(**{**SEVEN_B, "device_free": 78 * GiB, **kw})


def test_everything_fits_on_an_h100():
    plan = plan_placement(sizes())
    assert (plan.name, plan.weights, plan.activations) == ("device", "cuda", "cuda")
    assert plan.line() == "placement: weights cuda, activations cuda (2.00 GiB bfloat16), plan device"


def test_weights_stream_when_they_do_not_fit():
    plan = plan_placement(sizes(device_free=10 * GiB))
    assert (plan.name, plan.weights, plan.activations) == ("stream", "cpu", "cuda")
    assert plan.streams_weights and "weights cpu (streamed)" in plan.line()


def test_activations_go_to_the_host_last():
    plan = plan_placement(sizes(device_free=3 * GiB, activations=40 * GiB))
    assert (plan.name, plan.weights, plan.activations) == ("offload", "cpu", "cpu")
    assert plan.device_bytes == device_need("offload", sizes(device_free=3 * GiB, activations=40 * GiB))


def test_forced_plans_and_their_errors():
    assert plan_placement(sizes(device_free=10 * GiB), "cpu").name == "offload"
    assert plan_placement(sizes(), "weights").name == "stream"
    with pytest.raises(PrunekitError, match=r"nothing fits.*GPU memory.*--offload auto"):
        plan_placement(sizes(device_free=10 * GiB), "none")


def test_nothing_fits_names_the_fix():
    with pytest.raises(PrunekitError,
                       match=r"nothing fits: .* GiB needed in GPU memory.*lower --batch-size, --nsamples or --seqlen"):
        plan_placement(sizes(device_free=1 * GiB))
    with pytest.raises(PrunekitError, match=r"host RAM.*lower --batch-size, --nsamples"):
        plan_placement(sizes(device_free=3 * GiB, activations=40 * GiB, host_free=20 * GiB))
    with pytest.raises(PrunekitError, match="host RAM"):  # the CPU: one memory
        plan_placement(sizes(device_free=None, activations=30 * GiB, host_free=24 * GiB))
    with pytest.raises(PrunekitError, match="--offload 'tape' is not one of"):
        plan_placement(sizes(), "tape")
    with pytest.raises(PrunekitError, match="host RAM.*use --offload disk"):
        plan_placement(sizes(device_free=None, activations=3 * GiB, host_free=2 * GiB))


def test_disk_plan_puts_activations_in_the_first_place_that_fits():
    from prunekit.execution.placement import needs_disk
    assert plan_placement(sizes(), "disk").activations == "cuda"
    assert plan_placement(sizes(device_free=3 * GiB), "disk").activations == "cpu"
    plan = plan_placement(sizes(device_free=None, activations=40 * GiB, host_free=20 * GiB), "disk")
    assert (plan.weights, plan.activations) == ("disk", "scratch")
    assert plan.line() == "placement: weights disk (streamed), activations scratch (40.00 GiB bfloat16)"
    assert needs_disk(140 * GiB, 100 * GiB) and not needs_disk(13 * GiB, 100 * GiB)


def test_cpu_plan_and_dense_copies():
    plan = plan_placement(sizes(device_free=None, storage_dtype="float32", activation_copies=2))
    assert (plan.weights, plan.activations, plan.activation_bytes) == ("cpu", "cpu", 4 * GiB)
    assert plan.line() == "placement: weights cpu, activations cpu (4.00 GiB float32)"


def test_auto_storage_is_float32_where_the_activations_stay_and_it_costs_no_plan():
    """--activation-dtype auto, bf16 compute: float32 block inputs on the device and on the CPU; the
    compute dtype when float32 would need a slower plan, or when the activations travel anyway."""
    def pair(**kw):  # the same run with float32 and with bf16 block inputs
        wide = sizes(**{**kw, "activations": 2 * kw.get("activations", 2 * GiB),
                        "batch_activations": 2 * SEVEN_B["batch_activations"], "storage_dtype": "float32"})
        return wide, sizes(**kw)
    plan = plan_storage(*pair())
    assert (plan.name, plan.storage_dtype, plan.activation_bytes) == ("device", "float32", 4 * GiB)
    assert plan_storage(*pair(device_free=18 * GiB)).storage_dtype == "bfloat16"  # f32 would stream
    assert plan_storage(*pair(device_free=18 * GiB), "weights").storage_dtype == "float32"
    plan = plan_storage(*pair(device_free=3 * GiB, activations=40 * GiB))
    assert (plan.name, plan.storage_dtype) == ("offload", "bfloat16")  # over PCIe: half the traffic
    assert plan_storage(*pair(device_free=None)).storage_dtype == "float32"  # the CPU: one memory
    assert plan_storage(*pair(device_free=None, activations=9 * GiB, host_free=20 * GiB)).storage_dtype == "bfloat16"
    plan = plan_storage(*pair(device_free=None, activations=40 * GiB, host_free=20 * GiB), "disk")
    assert (plan.activations, plan.storage_dtype) == ("scratch", "bfloat16")
    with pytest.raises(PrunekitError, match="nothing fits"):  # neither fits: the compute dtype's error
        plan_storage(*pair(device_free=1 * GiB))


@pytest.mark.parametrize("dtype,stats,choice,stored", [("bfloat16", None, "auto", "float32"),
                                                       ("bfloat16", None, "bfloat16", "bfloat16"),
                                                       ("bfloat16", "float32", "auto", "float32"),
                                                       ("float32", None, "auto", "float32"),
                                                       ("float32", None, "bfloat16", "bfloat16")])
def test_activation_dtype_decides_the_stored_block_inputs(dtype, stats, choice, stored, samples, monkeypatch):
    from prunekit.execution import passes
    seen, original = [], passes.allocate_activations

    def spy(shape, dtype, *args, **kwargs):
        seen.append(dtype)
        return original(shape, dtype, *args, **kwargs)
    monkeypatch.setattr(passes, "allocate_activations", spy)
    config = PruneConfig(method="wanda", nsamples=8, seqlen=32, dtype=dtype, stats_dtype=stats,
                         activation_dtype=choice, device="cpu")
    report = prune(tiny_model("llama"), config, samples)
    assert report.placement["storage_dtype"] == stored and f"GiB {stored})" in report.placement["line"]
    assert seen and {str(d) for d in seen} == {f"torch.{stored}"}
    with pytest.raises(PrunekitError, match="--activation-dtype 'fp8' is not one of"):
        PruneConfig(activation_dtype="fp8")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method,allocation,pattern", [("wanda", "uniform", "unstructured"), ("stade", "owl", "2:4"),
                                                       ("magnitude", "alpha", "unstructured")])
def test_every_plan_gives_the_same_model(method, allocation, pattern, samples, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for offload in ("none", "weights", "cpu"):
        model = tiny_model("llama")
        config = PruneConfig(method=method, allocation=allocation, pattern=pattern,
                             sparsity=0.5 if pattern == "unstructured" else None, nsamples=8, seqlen=32,
                             batch_size=3, dtype="float32", device=device, offload=offload)
        report = prune(model, config, samples)
        results[offload] = (_state(model), report)
    reference, ref_report = results["none"]
    for offload, (state, report) in results.items():
        assert report.layers == ref_report.layers
        for k in reference:
            assert torch.equal(state[k], reference[k]), (offload, k)


def test_record_error_per_block(samples):
    model = tiny_model("llama")
    report = prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, record_error=True, device="cpu"), samples)
    assert [e["block"] for e in report.block_error] == [0, 1]
    assert all(0 < e["rel_mse"] < 1 for e in report.block_error)
    # by hand for block 0: same inputs, dense vs pruned block
    dense = tiny_model("llama")
    with torch.no_grad():
        h = dense.model.embed_tokens(samples)
        pos = torch.arange(samples.shape[1])[None]
        rope = dense.model.rotary_emb(h, pos)
        y_dense = dense.model.layers[0](h, position_embeddings=rope)
        y_pruned = model.model.layers[0](h, position_embeddings=rope)
    y_dense = y_dense[0] if isinstance(y_dense, tuple) else y_dense
    y_pruned = y_pruned[0] if isinstance(y_pruned, tuple) else y_pruned
    expected = ((y_pruned - y_dense).square().sum() / y_dense.square().sum()).item()
    assert report.block_error[0]["rel_mse"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_bf16_run_keeps_activations_on_the_device(samples):
    model = tiny_model("llama").to(torch.bfloat16)
    report = prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cuda"), samples)
    assert report.placement["activations"] == "cuda" and report.placement["storage_dtype"] == "float32"
    report = prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cuda", activation_dtype="bfloat16"),
                   samples)
    assert report.placement["activations"] == "cuda" and report.placement["storage_dtype"] == "bfloat16"
    assert next(model.parameters()).device.type == "cpu"  # back where it came from


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("offload", ["none", "weights", "cpu"])
def test_cuda_residual_in_compute_dtype(samples, offload):
    """--residual-dtype compute on a GPU under each plan: bf16 block inputs, masks close to those of
    the float32 residual stream."""
    from test_dtypes import _masks
    adapter = adapter_for("llama")
    low, wide = tiny_model("llama").to(torch.bfloat16), tiny_model("llama").to(torch.bfloat16)
    report = prune(low, PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cuda", offload=offload,
                                    residual_dtype="compute"), samples)
    prune(wide, PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cuda", offload=offload), samples)
    assert report.placement["storage_dtype"] == "bfloat16" and report.sparsity == pytest.approx(0.5)
    a, b = _masks(low, adapter), _masks(wide, adapter)
    assert min((a[k] == b[k]).float().mean().item() for k in a) > 0.9


@pytest.fixture
def fake_cuda_streamer(monkeypatch):
    """A context manager: inside, BlockStreamer is active on the CPU, CUDA's streams, events and
    syncs replaced by no-op stand-ins and its two copies by clones that record their thread and host
    storage; it yields those records ({"up": [...], "down": [...]}, entries (thread, host data_ptr))."""
    import contextlib
    import threading

    from prunekit.execution import streaming

    class Fake:  # a stream or an event: every call a no-op
        def __init__(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    calls = {"up": [], "down": []}

    real_up, real_down = streaming.BlockStreamer._up, streaming.BlockStreamer._down

    def up(self, host, stage):  # the real copies through the staging view; the "device" copy a clone
        calls["up"].append((threading.current_thread().name, host.data_ptr()))
        return real_up(self, host, stage)

    def down(self, pairs, stages):
        calls["down"] += [(threading.current_thread().name, host.data_ptr()) for _, host in pairs]
        real_down(self, pairs, stages)

    init = streaming.BlockStreamer.__init__

    def active_init(self, blocks, device, plan):
        init(self, blocks, device, plan)
        assert not self.active  # the CPU: nothing to stream, until told
        self.active, self.side = True, Fake()
        self.worker = streaming.ThreadPoolExecutor(1, thread_name_prefix="prunekit-copies")
    @contextlib.contextmanager
    def active():
        with monkeypatch.context() as patch:
            for name in ("Stream", "Event"):
                patch.setattr(torch.cuda, name, Fake)
            patch.setattr(torch.cuda, "current_stream", lambda *a: Fake())
            patch.setattr(torch.cuda, "stream", lambda *a: contextlib.nullcontext())
            patch.setattr(torch.cuda, "device", lambda *a: contextlib.nullcontext())
            patch.setattr(torch.cuda, "synchronize", lambda *a: None)
            patch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
            patch.setattr(streaming.BlockStreamer, "__init__", active_init)
            patch.setattr(streaming.BlockStreamer, "_up", up)
            patch.setattr(streaming.BlockStreamer, "_down", down)
            patch.setattr(streaming.BlockStreamer, "_to_device", lambda self, stage: stage.clone())
            patch.setattr(streaming.BlockStreamer, "_pinned", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8)))
            yield calls
    return active


@pytest.mark.parametrize("offload, uploads, method, allocation", [
    ("weights", 2, "wanda", "owl"), ("none", 1, "wanda", "owl"), ("none", 1, "stade", "owl"),
    ("weights", 1, "magnitude", "alpha"), ("none", 1, "magnitude", "alpha"), ("cpu", 1, "sparsegpt", "uniform")])
def test_streamer_copies_on_its_worker_thread(samples, monkeypatch, tmp_path, offload, uploads, method, allocation,
                                              fake_cuda_streamer):
    """The streamer's control flow on the CPU (fake_cuda_streamer): every copy runs on the worker
    thread (never on the main thread); with OWL's dense pass first, plan `stream` uploads each block
    once per pass and plan `device` once per prune (alpha reads every weight on the device first,
    from the same upload); each pruned block is copied back once, into the very host tensors it came
    from; and the pruned model equals the unstreamed run's. STADE adds biases to blocks already on
    the device: they come back too."""
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))  # alpha's ESD cache
    config = dict(method=method, nsamples=8, seqlen=32, dtype="float32", device="cpu", allocation=allocation)
    streamed = tiny_model("llama")
    storage = {name: p.data_ptr() for name, p in streamed.named_parameters()}
    before = len(list(streamed.model.layers[0].parameters())) + len(list(streamed.model.layers[0].buffers()))
    with fake_cuda_streamer() as calls:
        prune(streamed, PruneConfig(offload=offload, **config), samples)
    plain = tiny_model("llama")
    prune(plain, PruneConfig(offload=offload, **config), samples)
    blocks = streamed.model.layers
    after = len(list(blocks[0].parameters())) + len(list(blocks[0].buffers()))
    assert (after > before) == (method == "stade")
    assert len(calls["up"]) == uploads * before * len(blocks)
    assert len(calls["down"]) == after * len(blocks)
    assert all(thread.startswith("prunekit-copies") for kind in calls.values() for thread, _ in kind)
    assert sorted(h for _, h in calls["down"]) == sorted(t.data_ptr() for b in blocks for t in [*b.parameters(), *b.buffers()])
    assert storage.items() <= {name: p.data_ptr() for name, p in streamed.named_parameters()}.items()
    assert all(torch.equal(a, b) for a, b in zip(streamed.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("method, allocation, early", [
    ("wanda", "uniform", True), ("sparsegpt", "uniform", True), ("stade", "uniform", False),
    ("wanda", "alpha", False), ("wanda", "owl", False)])
def test_first_upload_overlaps_the_capture_where_nothing_changes_the_blocks(
        method, allocation, early, samples, monkeypatch, tmp_path, fake_cuda_streamer):
    """The first block's upload is queued before the input capture when no allocation reads the
    weights on the device and no bias is added to a block before it is pruned; else after both."""
    from prunekit.execution import loop, streaming
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    events = []
    capture, prefetch = loop.capture_block_inputs, streaming.BlockStreamer.prefetch
    monkeypatch.setattr(loop, "capture_block_inputs", lambda *a, **k: events.append("capture") or capture(*a, **k))
    model = tiny_model("llama")
    with fake_cuda_streamer():
        monkeypatch.setattr(streaming.BlockStreamer, "prefetch",
                            lambda self, i: events.append(("upload", i)) or prefetch(self, i))
        prune(model, PruneConfig(method=method, allocation=allocation, nsamples=8, seqlen=32, dtype="float32",
                                 device="cpu", offload="weights"), samples)
    first = events.index(("upload", 0))
    assert (first < events.index("capture")) == early


@pytest.mark.parametrize("allocation, before", [("alpha", True), ("uniform", True), ("owl", False)])
def test_an_allocation_from_the_weights_alone_runs_before_the_capture(allocation, before, samples, monkeypatch,
                                                                       tmp_path):
    """AlphaPruning (and uniform) allocate before the block-0 inputs are captured, so the ESD's Gram
    matrices and the captured inputs are never on the device together; OWL, which runs dense passes
    over those inputs, allocates after the capture and sees them."""
    from prunekit.execution import loop
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    events = []
    capture, allocate = loop.capture_block_inputs, loop.allocate
    monkeypatch.setattr(loop, "capture_block_inputs", lambda *a, **k: events.append("capture") or capture(*a, **k))
    monkeypatch.setattr(loop, "allocate", lambda name, ctx: events.append(("allocate", ctx.inputs is None))
                        or allocate(name, ctx))
    report = prune(tiny_model("llama"), PruneConfig(method="wanda", allocation=allocation, nsamples=8, seqlen=32,
                                                    dtype="float32", device="cpu"), samples)
    assert events == ([("allocate", True), "capture"] if before else ["capture", ("allocate", False)])
    assert report.sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("offload", ["none", "weights"])
def test_streamer_brings_blocks_back_after_an_error(samples, offload, fake_cuda_streamer):
    """A prune that stops on an error (a NaN in block 0) leaves no block on the device: every
    parameter points at the storage it had before, and the worker is stopped."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    with fake_cuda_streamer() as calls, pytest.raises(PrunekitError, match="NaN/inf in the pruning scores of block 0"):
        prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=32, dtype="float32", device="cpu",
                                 offload=offload), samples)
    assert calls["up"]  # the stand-ins were in use
    assert storage == {name: p.data_ptr() for name, p in model.named_parameters()}


def test_visiting_points_back_without_copying():
    """A read-only visit to a GPU and back, the copy a clone on the CPU: inside, every parameter and
    buffer but the excluded ones is a copy; after, each points at its own storage again, values
    unchanged, also after an error."""
    from prunekit.execution.streaming import visiting
    model = tiny_model("llama")
    before = {name: (t.data_ptr(), t.clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    blocks = model.model.layers
    with pytest.raises(RuntimeError, match="inside"):
        with visiting(model, "cuda", exclude=blocks, copy=torch.clone):
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                assert (t.data_ptr() == before[name][0]) == name.startswith("model.layers."), name
            raise RuntimeError("inside")
    after = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert before.keys() == after.keys()
    for name, (ptr, value) in before.items():
        assert after[name].data_ptr() == ptr and torch.equal(after[name], value), name


def test_input_groups_and_the_statistics_work_estimate():
    """Linears that read one tensor form one group (one X^T X for SparseGPT); the planner's work
    estimate counts one columns^2 float32 matrix per group plus one transient of the widest."""
    from prunekit.adapters import adapter_for
    from prunekit.execution.loop import placement_sizes
    from prunekit.execution.precision import Compute
    from prunekit.scoring import build_scorer
    assert adapter_for("llama").input_groups() == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                                   ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                                   ("mlp.down_proj",)]
    assert [len(g) for g in adapter_for("opt").input_groups()] == [3, 1, 1, 1]
    model, adapter = tiny_model("llama"), adapter_for("llama")
    compute = Compute(torch.device("cpu"), torch.float32)
    work = {}
    for method in ("wanda", "sparsegpt"):
        config = PruneConfig(method=method, nsamples=4, seqlen=16)
        work[method] = placement_sizes(model, adapter, config, compute, build_scorer(config), (4, 16)).work
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    assert work["sparsegpt"] - work["wanda"] == 4 * (3 * hidden ** 2 + inter ** 2) + 4 * max(hidden, inter) ** 2


def test_pinned_ring_views_and_slots():
    """The staging ring: one view per tensor (its shape and dtype, ALIGN-aligned, none overlapping),
    the slots used in turn, a slot handed out again only after its last copy's event, and grown
    when a larger block comes."""
    from prunekit.execution.streaming import ALIGN, PinnedRing
    made = []
    ring = PinnedRing(lambda n: made.append(n) or torch.empty(n, dtype=torch.uint8))
    tensors = [torch.randn(3, 5), torch.arange(7).to(torch.bfloat16), torch.arange(4)]
    slot, views = ring.take(tensors)
    assert [(v.shape, v.dtype) for v in views] == [(t.shape, t.dtype) for t in tensors]
    assert {(v.data_ptr() - views[0].data_ptr()) % ALIGN for v in views} == {0}
    for v, t in zip(views, tensors):
        v.copy_(t)
    assert all(torch.equal(v, t) for v, t in zip(views, tensors))

    class Event:
        synced = False

        def synchronize(self):
            self.synced = True
    event = ring.events[slot] = Event()
    other, _ = ring.take(tensors)
    assert other != slot and not event.synced
    again, _ = ring.take(tensors)
    assert again == slot and event.synced and ring.events[slot] is None
    assert made == [3 * ALIGN, 3 * ALIGN]  # one buffer per slot, reused
    ring.take([torch.empty(1000)])
    assert made[-1] == 8 * ALIGN  # 4000 bytes, rounded up: the slot grew


def test_default_batch_follows_the_device(monkeypatch):
    """Without --batch-size: 2048 calibration tokens a forward on the CPU, 16384 on a GPU."""
    from prunekit import config as config_module
    assert PruneConfig(seqlen=512, device="cpu").effective_batch_size == 4
    assert PruneConfig(seqlen=4096, device="cpu").effective_batch_size == 1
    assert PruneConfig(seqlen=2048, device="cpu", batch_size=3).effective_batch_size == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert PruneConfig(seqlen=2048, device="cuda").effective_batch_size == config_module.TOKENS_PER_BATCH["cuda"] // 2048
    assert PruneConfig(seqlen=2048).effective_batch_size == 8  # auto: the GPU


def test_the_default_batch_never_costs_a_slower_plan():
    """plan_batch on given sizes (a 7B model's, a pass's working memory growing with the batch): the
    largest batch whose plan is as fast as the smallest's, recorded in the plan; nothing fitting even at
    the smallest raises that one's error."""
    from prunekit.execution.placement import plan_batch

    def plan_at(free):
        return lambda b: plan_placement(sizes(device_free=free * GiB, work=int(1.5 * b * GiB),
                                              batch_activations=b * GiB // 8))
    batches = [8, 4, 2, 1]
    assert (plan_batch(plan_at(78), batches).name, plan_batch(plan_at(78), batches).batch_size) == ("device", 8)
    plan = plan_batch(plan_at(22), batches)  # device at 8 needs 27 GiB: 2 sequences a forward keep plan device
    assert (plan.name, plan.batch_size) == ("device", 2)
    plan = plan_batch(plan_at(7), batches)  # stream at 1 and 2 only
    assert (plan.name, plan.batch_size) == ("stream", 2)
    assert plan_batch(plan_at(78), [3]).batch_size == 3  # a batch asked for: that one
    with pytest.raises(PrunekitError, match="nothing fits"):
        plan_batch(plan_at(1), batches)


def test_the_plan_records_its_batch(samples):
    from prunekit.execution.loop import default_batches
    report = prune(tiny_model("llama"), PruneConfig(method="wanda", nsamples=8, seqlen=32, device="cpu"), samples)
    assert report.placement["batch_size"] == 8  # 2048 tokens a forward on the CPU, 8 sequences at most
    assert default_batches(PruneConfig(nsamples=128, seqlen=256, device="cpu"), 128) == [8, 4, 2, 1]
    assert default_batches(PruneConfig(seqlen=256, batch_size=3, device="cpu"), 128) == [3]


def test_host_need_counts_the_staging_slots():
    from prunekit.execution.placement import host_need
    s = sizes()  # a 0.38 GiB block: two 512 MiB pinned slots
    assert host_need("device", s) == host_need("stream", s) == GiB
    assert host_need("offload", s) == GiB + s.activations
