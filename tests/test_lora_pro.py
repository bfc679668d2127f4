"""LoRA-Pro: the reference's adjusted-gradient formula on a small layer, the projection it realises,
the full optimizer step, and resume."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.adapters.lora_pro import LoRAProOptimizer, adjust, solve_sylvester

from .conftest import tiny_vit
from .helpers import assert_optimizer_resumes_exactly


def ref_sylvester(A, B, C):
    """The reference's solver (deepspeed helper): A X + X B = C via complex eigendecompositions."""
    B = -B
    R, U = torch.linalg.eig(A)
    S, V = torch.linalg.eig(B)
    F_ = torch.linalg.solve(U, (C + 0j) @ V)
    Y = F_ / (R[:, None] - S[None, :])
    return (U @ Y @ torch.linalg.inv(V)).real


def ref_adjust(A, B, gA, gB, s, step):
    """``lorapro_full_adjustment``'s gradient correction, as the reference writes it."""
    inv = lambda M: torch.linalg.pinv(M + 1e-8 * torch.eye(M.shape[0], dtype=M.dtype))  # noqa: E731
    AAt_inv = inv(A @ A.t())
    if step == 0:
        return gA, (gB @ AAt_inv) / s ** 2
    BtB_inv = inv(B.t() @ B)
    X = ref_sylvester(B.t() @ B, A @ A.t(), -(BtB_inv @ gA) @ A.t() / s ** 2)
    proj = torch.eye(B.shape[0], dtype=B.dtype) - B @ BtB_inv @ B.t()
    return (BtB_inv @ gA) / s ** 2 + X @ A, (proj @ (gB @ AAt_inv)) / s ** 2 - B @ X


def factors(seed=0, d_out=9, d_in=7, r=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d_in, generator=g, dtype=torch.float64), torch.randn(d_out, r, generator=g, dtype=torch.float64),
            torch.randn(d_out, d_in, generator=g, dtype=torch.float64))


def test_sylvester_solver():
    P, Q, _ = factors()
    P, Q = P @ P.t(), (Q.t() @ Q)
    C = torch.randn(3, 3, dtype=torch.float64)
    X = solve_sylvester(P, Q, C)
    torch.testing.assert_close(P @ X + X @ Q, C)
    torch.testing.assert_close(X, ref_sylvester(P, Q, C))


@pytest.mark.parametrize("step", [0, 1])
def test_adjustment_matches_the_reference_formula(step):
    A, B, g = factors()
    s = 2.0
    gA, gB = s * B.t() @ g, s * g @ A.t()  # the raw LoRA gradients of the full gradient g
    got = adjust(A.float(), B.float(), gA.float(), gB.float(), s, first=step == 0)
    want = ref_adjust(A, B, gA, gB, s, step)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_equivalent_gradient_is_the_projection_of_the_full_gradient():
    """s(B g_A + g_B A) = P_B g + (I − P_B) g P_A: the closest matrix to g a LoRA step can make."""
    A, B, g = factors(1)
    s = 0.5
    gA, gB = adjust(A.float(), B.float(), (s * B.t() @ g).float(), (s * g @ A.t()).float(), s, first=False)
    equiv = s * (B.float() @ gA + gB @ A.float())
    PB = B @ torch.linalg.pinv(B.t() @ B) @ B.t()
    PA = A.t() @ torch.linalg.pinv(A @ A.t()) @ A
    want = PB @ g + (torch.eye(9, dtype=g.dtype) - PB) @ g @ PA
    torch.testing.assert_close(equiv.double(), want, rtol=1e-4, atol=1e-4)


def test_optimizer_step_is_adam_on_the_equivalent_gradient_then_sgd():
    A0, B0, _ = factors(2)
    A = torch.nn.Parameter(A0.float().clone())
    B = torch.nn.Parameter(torch.zeros(9, 3))
    s, lr, betas, eps = 2.0, 0.05, (0.9, 0.999), 1e-8
    opt = LoRAProOptimizer([{"params": [A, B], "lr": lr, "weight_decay": 0.0}], [(A, slice(0, 3), B, s)], lr=lr,
                           betas=betas, eps=eps)
    a, b = A0.clone(), torch.zeros(9, 3, dtype=torch.float64)
    m = v = None
    for t in range(3):
        g = torch.randn(9, 7, generator=torch.Generator().manual_seed(10 + t), dtype=torch.float64)
        A.grad, B.grad = (s * b.t() @ g).float(), (s * g @ a.t()).float()
        opt.step()
        gA, gB = ref_adjust(a, b, s * b.t() @ g, s * g @ a.t(), s, t)
        equiv = s * (b @ gA + gB @ a)
        m = (1 - betas[0]) * equiv if m is None else betas[0] * m + (1 - betas[0]) * equiv
        v = (1 - betas[1]) * equiv ** 2 if v is None else betas[1] * v + (1 - betas[1]) * equiv ** 2
        G = (m / (1 - betas[0] ** (t + 1))) / ((v / (1 - betas[1] ** (t + 1))).sqrt() + eps)
        gA, gB = ref_adjust(a, b, s * b.t() @ G, s * G @ a.t(), s, t)
        a, b = a - lr * gA, b - lr * gB
        torch.testing.assert_close(A.detach().double(), a, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(B.detach().double(), b, rtol=1e-3, atol=1e-4)


def _model():
    torch.manual_seed(0)
    model = zoo.ImageClassifier(tiny_vit(), 3)
    zoo.apply_adapter(model, "lora_pro", rank=2)
    return model


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_resume_from_saved_state_equals_an_uninterrupted_run():
    opt = assert_optimizer_resumes_exactly(_model, n_steps=4, split=2, lr=1e-2)
    assert any(st.get("exp_avg") is not None and st["exp_avg"].shape == (64, 64) for st in opt.state.values())


def test_trains_only_lora_factors_and_head_and_merges():
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert zoo.count_parameters(model.backbone)[0] == 2 * (2 * 2 * 64 + 2 * 64 * 2)  # per block: A (2r×64), B_q, B_v (64×r)
    opt = zoo.build_optimizer(model, zoo.param_groups(model, 1e-2, 0.0), 1e-2, 0.0)
    x = torch.randn(2, 3, 32, 32)
    _train(model, opt, [(x, torch.tensor([0, 1]))] * 2)
    model.eval()
    with torch.no_grad():
        y = model(x)
        zoo.merge_adapters(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
