import numpy as np
import torch

from model_store.user_model import (
    UserModelConfig,
    retrieval_query,
    retrieval_vectors,
    train_user_model,
    user_states,
)


def _model():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 40, size=n) for n in (3, 8, 30, 60)]
    cfg = UserModelConfig(dim=32, layers=2, heads=2, max_len=16, epochs=2)
    return train_user_model(seqs, 40, cfg, show_progress=False)


def test_states_of_short_and_empty_histories_are_finite_unit_vectors() -> None:
    model = _model()
    histories = [np.array([], dtype=np.int64), np.array([3]), np.arange(5), np.arange(40)]
    states = user_states(model, histories)
    assert np.isfinite(states).all()
    assert np.allclose(states[0], 0.0)  # no history, no embedding
    assert np.allclose(np.linalg.norm(states[1:], axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_a_users_state() -> None:
    model = _model()
    history = np.array([5, 7, 9])
    alone = user_states(model, [history])[0]
    with_longer = user_states(model, [history, np.arange(16)])[0]
    assert np.allclose(alone, with_longer, atol=1e-5)


def test_retrieval_vectors_score_like_the_training_logits() -> None:
    model = _model()
    with torch.no_grad():  # a prior as strong as the vectors, so counting it wrongly shows
        model.item_bias.copy_(torch.linspace(-3.0, 3.0, model.n_items))
    user = user_states(model, [np.array([1, 2, 3])])[0]
    with torch.inference_mode():
        logits = model.scores(torch.from_numpy(user)[None])[0].numpy()
    by_inner_product = retrieval_vectors(model) @ retrieval_query(user)
    assert np.allclose(by_inner_product, logits * model.cfg.temperature, atol=1e-3)
