"""compact changes nothing silently: frozen parameters stay frozen, each module keeps its train/eval mode, the
self-check's tolerance follows the dtype (and a low-precision failure says so), and masks that no longer match the
applied ticket (a state_dict from before ``apply_ticket`` loaded after it) are a typed error, not a wrong model."""

from __future__ import annotations

import copy

import pytest
import torch

import ebcompile
from ebcompile.errors import CompactionError, EbcompileError, TicketStateError
from ebcompile.transforms.verify import check_same_function

from conftest import image_batch, make_mlp, make_vit, mlp_batch


def check(info: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(info.value)
    assert isinstance(info.value, EbcompileError) and "Fix:" in msg, msg
    assert all(w.lower() in msg.lower() for w in words), (words, msg)


def ticketed(make, batch, structure: str = "structured"):
    model = make()
    ebcompile.prepare(model, batch(), ratio=0.5, structure=structure)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    return model


def test_frozen_parameters_stay_frozen_in_replaced_attention_modules():
    model = make_vit()
    for name, p in model.named_parameters():
        p.requires_grad_("self_attention" not in name)  # in_proj_bias too: nn.MultiheadAttention is replaced
    ebcompile.prepare(model, image_batch(), ratio=0.5)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    small = ebcompile.compact(model, round_to=None)
    attn = small.encoder.layers[0].self_attention
    assert type(attn).__name__ == "CompactMultiheadAttention"
    assert {n: p.requires_grad for n, p in small.named_parameters() if "self_attention" in n} == \
        {n: False for n, _ in small.named_parameters() if "self_attention" in n}
    assert all(p.requires_grad for n, p in small.named_parameters() if "self_attention" not in n)


@pytest.mark.parametrize("training", [True, False])
def test_compact_keeps_each_modules_train_or_eval_mode(training):
    model = ticketed(make_vit, image_batch).train(training)
    model.encoder.dropout.train(not training)  # a module whose mode differs from its parent's keeps its own
    small = ebcompile.compact(model)
    assert model.encoder.dropout.training is (not training)  # the self-check leaves the masked model's modes
    assert small.training is training and small.encoder.dropout.training is (not training)
    assert small.encoder.layers[1].self_attention.training is training  # a replaced module: its parent's mode
    assert {m.training for n, m in small.named_modules() if n.startswith("encoder.layers")} == {training}


def bf16_mlp() -> torch.nn.Module:
    return make_mlp().to(torch.bfloat16)


def test_the_self_check_tolerance_follows_a_low_precision_dtype():
    masked, x = bf16_mlp(), mlp_batch().to(torch.bfloat16)
    same = copy.deepcopy(masked)
    with torch.no_grad():  # the same function up to bfloat16 rounding (another kernel's summation order)
        for p in same.parameters():
            p.mul_(1 + torch.finfo(torch.bfloat16).eps * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).sign())
    assert check_same_function(masked, same, ((x,), {}), ["0", "2", "4"]) > 1e-3


def test_a_low_precision_self_check_failure_names_the_dtype_and_the_float32_fix():
    masked, x = bf16_mlp(), mlp_batch().to(torch.bfloat16)
    wrong = copy.deepcopy(masked)
    with torch.no_grad():
        wrong[2].weight[:8] = 0
    with pytest.raises(CompactionError) as info:
        check_same_function(masked, wrong, ((x,), {}), ["0", "2", "4"])
    check(info, "bfloat16", "float32", "2 (Linear)")


def test_the_named_fix_compacts_a_bfloat16_model_in_float32_with_its_bfloat16_example():
    model = make_vit().to(torch.bfloat16)
    x = image_batch().to(torch.bfloat16)
    ebcompile.prepare(model, x, ratio=0.5)
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with torch.no_grad():
        masked = model(x).float()
        small = ebcompile.compact(model.float()).to(torch.bfloat16)
        torch.testing.assert_close(small(x).float(), masked, atol=0.05, rtol=0.05)


def test_a_float32_self_check_failure_does_not_blame_the_dtype():
    masked, x = make_mlp(), mlp_batch()
    wrong = copy.deepcopy(masked)
    with torch.no_grad():
        wrong[2].weight[:8] = 0
    with pytest.raises(CompactionError) as info:
        check_same_function(masked, wrong, ((x,), {}), ["0", "2", "4"])
    assert "float32" not in str(info.value) and "dtype" not in str(info.value)


@pytest.mark.parametrize("make,batch,structure", [(make_mlp, mlp_batch, "structured"),
                                                  (make_vit, image_batch, "structured"),
                                                  (make_mlp, mlp_batch, "unstructured")])
def test_a_state_dict_from_before_apply_ticket_is_named_with_its_fix(make, batch, structure):
    model = make()
    ebcompile.prepare(model, batch(), ratio=0.5, structure=structure)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ticket = ebcompile.draw_ticket(model)
    ebcompile.apply_ticket(model, ticket)
    model.load_state_dict(before)  # all-ones masks and unpruned weights over the frozen ticket
    with pytest.raises(TicketStateError) as info:
        ebcompile.compact(model)
    check(info, "state_dict", "before apply_ticket", "apply_ticket(model, ticket)")
    ebcompile.apply_ticket(model, ticket)  # the fix it names
    small = ebcompile.compact(model)
    with torch.no_grad():
        torch.testing.assert_close(small(batch()), model(batch()))


def test_a_plain_state_dict_loaded_after_apply_ticket_keeps_the_ticket_and_compacts():
    model = ticketed(make_mlp, mlp_batch)
    model.load_state_dict(make_mlp().state_dict())  # no mask keys: the ticket's masks stay
    small = ebcompile.compact(model)
    with torch.no_grad():
        torch.testing.assert_close(small(mlp_batch()), model(mlp_batch()))


class _ActionTime(torch.nn.Module):
    """A time embedding expanded to the action embedding's shape (``expand_as``, as pi0 does): the export graph's
    static sizes do not show that one width is read from the other."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.action_in, self.time = torch.nn.Linear(6, d), torch.nn.Linear(1, d)
        self.mlp_in, self.mlp_out = torch.nn.Linear(2 * d, d), torch.nn.Linear(d, d)

    def forward(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.action_in(noise)
        te = self.time(t)[:, None, :].expand_as(a)
        return self.mlp_out(torch.nn.functional.silu(self.mlp_in(torch.cat([a, te], dim=2))))


class _WithActionTime(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = _ActionTime()
        self.fc1, self.fc2, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 2)

    def forward(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.embed(noise, t)
        return self.head(h + self.fc2(torch.nn.functional.gelu(self.fc1(h))))


def test_a_module_whose_compact_forward_raises_keeps_its_units_whole_and_the_rest_is_cut(tmp_path):
    torch.manual_seed(0)
    model, x = _WithActionTime().eval(), (torch.randn(2, 4, 6), torch.randn(2, 1))
    ebcompile.prepare(model, x, ratio=0.5, structure="structured", importance="magnitude")
    ebcompile.apply_ticket(model, ebcompile.draw_ticket(model))
    with pytest.warns(UserWarning, match="keeps the units .* of embed whole"):
        small = ebcompile.compact(model, round_to=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(*x), model(*x))
    skipped = model._ebcompile.plan.skipped
    assert "expanded size" in skipped["embed.action_in"] and "embed.time" in skipped
    assert small.embed.action_in.out_features == 16 and small.fc1.out_features < 32  # only the failing scope is held
    ebcompile.save(small, tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(ebcompile.load(tmp_path / "s", model=_WithActionTime()).eval()(*x), small(*x))


def test_a_compact_forward_that_raises_outside_the_watched_modules_names_the_innermost_running_one():
    class Inner(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], 3, -1)  # raises on a width that is not a multiple of 3

    class Outer(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.lin, self.blk = torch.nn.Linear(4, width), torch.nn.Sequential(Inner())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blk(self.lin(x))

    example = ((torch.randn(2, 4),), {})
    with pytest.raises(CompactionError) as info:
        check_same_function(Outer(6), Outer(5), example, modules=["lin"])
    check(info, "blk.0 (Inner)", "exclude=['blk.0.*']")
    assert info.value.module == "blk.0" and "RuntimeError" in info.value.cause
