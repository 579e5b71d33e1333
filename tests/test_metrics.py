"""Metric semantics on hand-built logits whose expected values are worked out in each test."""

import pytest
import torch

from mmke import metrics

V = 5


def one_hot_logits(token_ids: list[list[int]]) -> torch.Tensor:
    """Logits whose argmax at [b, t] is token_ids[b][t] (second choice is (id+1) % V)."""
    ids = torch.tensor(token_ids)
    logits = torch.zeros(*ids.shape, V)
    logits.scatter_(2, ids.unsqueeze(-1), 2.0)
    logits.scatter_(2, ((ids + 1) % V).unsqueeze(-1), 1.0)
    return logits


def test_shift_pairs_prediction_with_next_label():
    # position t predicts label t+1: predictions [1,2,3,x] vs labels [x,1,2,4] -> 2 of 3 right
    logits = one_hot_logits([[1, 2, 3, 0]])
    labels = torch.tensor([[-100, 1, 2, 4]])
    assert metrics.token_accuracy(logits, labels) == pytest.approx(2 / 3)


def test_token_accuracy_pools_tokens_over_batch_not_items():
    # item 0: 1 target token, right; item 1: 3 target tokens, 1 right -> pooled 2/4, item-mean 2/3
    logits = one_hot_logits([[4, 0, 0, 0], [1, 2, 3, 0]])
    labels = torch.tensor([[-100, 4, -100, -100], [-100, 1, 0, 0]])
    assert metrics.token_accuracy(logits, labels) == pytest.approx(0.5)
    per_item = metrics.per_item_accuracy(logits, labels, exact_match=False)
    assert per_item.tolist() == pytest.approx([1.0, 1 / 3])


def test_exact_match_needs_every_target_token():
    logits = one_hot_logits([[1, 2, 0], [1, 2, 0]])
    labels = torch.tensor([[-100, 1, 2], [-100, 1, 3]])
    assert metrics.per_item_accuracy(logits, labels, exact_match=True).tolist() == [1.0, 0.0]
    assert metrics.per_item_accuracy(logits, labels, exact_match=False).tolist() == [1.0, 0.5]


def test_prompt_and_image_positions_do_not_count():
    # predictions are wrong at every masked position; only the last label counts and it is right
    logits = one_hot_logits([[3, 3, 3, 2, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, 2]])
    assert metrics.token_accuracy(logits, labels) == 1.0


def test_item_without_target_is_an_error():
    logits = one_hot_logits([[1, 2]])
    with pytest.raises(ValueError, match="no target"):
        metrics.per_item_accuracy(logits, torch.tensor([[-100, -100]]), exact_match=True)


def test_misaligned_logits_are_refused():
    with pytest.raises(ValueError, match="not aligned"):
        metrics.token_accuracy(torch.zeros(1, 3, V), torch.zeros(1, 4, dtype=torch.long))


def test_top_k_drops_padding_only():
    logits = one_hot_logits([[1, 2, 3], [4, 0, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    top1 = metrics.top_k_predictions(logits, mask, k=1)
    assert [t.squeeze(-1).tolist() for t in top1] == [[1, 2, 3], [4, 0]]
    top2 = metrics.top_k_predictions(logits, mask, k=2)
    assert top2[1].tolist() == [[4, 0], [0, 1]]


def test_text_locality_compares_top1_at_every_position():
    pre = torch.tensor([[1], [2], [3], [4]])
    post = torch.tensor([[1], [0], [3], [0]])
    assert metrics.locality_agreement(pre, post) == 0.5


def test_locality_right_aligns_different_lengths():
    # post has two extra leading positions (e.g. in-context demonstrations): they are ignored
    pre = torch.tensor([[7], [8], [9]])
    post = torch.tensor([[0], [0], [7], [8], [1]])
    assert metrics.locality_agreement(pre, post) == pytest.approx(2 / 3)


def test_multimodal_locality_compares_top10_element_by_element():
    pre = torch.arange(20).reshape(2, 10)
    post = pre.clone()
    post[0, 9] = 99  # one slot of 20 changes rank content
    post[1] = post[1].flip(0)  # same set, different order: every slot differs
    assert metrics.locality_agreement(pre, post) == pytest.approx(9 / 20)


def test_mean_metrics_is_mean_of_records():
    rows = [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.5}, {"a": 1.0, "b": 1.0}]
    assert metrics.mean_metrics(rows, ["a", "b"]) == pytest.approx({"a": 2 / 3, "b": 0.5})
    with pytest.raises(ValueError):
        metrics.mean_metrics([], ["a"])


def test_both_definitions_come_from_the_same_argmax():
    # item 0: 2 of 2 target tokens right; item 1: 1 of 2 right; item 2: 0 of 1 right
    predicted = torch.tensor([[1, 2, 0], [1, 4, 0], [3, 0, 0]])
    labels = torch.tensor([[-100, 1, 2], [-100, 1, 2], [-100, 1, -100]])
    both = metrics.both_accuracies(predicted, labels)
    assert both["em"].tolist() == [1.0, 0.0, 0.0]
    assert both["token"].tolist() == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("exact_match, headline", [(True, [1.0, 0.0, 0.0]), (False, [1.0, 0.5, 0.0])])
def test_row_scores_keep_both_and_the_protocol_picks_the_headline(exact_match, headline):
    """One dict per row, also where rows share a metric (several records' items in one forward)."""
    predicted = one_hot_logits([[1, 2, 0], [1, 4, 0], [3, 0, 0]]).argmax(dim=-1)
    labels = torch.tensor([[-100, 1, 2], [-100, 1, 2], [-100, 1, -100]])
    scores = metrics.row_scores(["rewrite_acc", "rewrite_acc", "rephrase_acc"], predicted, labels, exact_match)
    assert scores == [
        {"rewrite_acc": headline[0], "rewrite_acc_em": 1.0, "rewrite_acc_token": 1.0},
        {"rewrite_acc": headline[1], "rewrite_acc_em": 0.0, "rewrite_acc_token": 0.5},
        {"rephrase_acc": headline[2], "rephrase_acc_em": 0.0, "rephrase_acc_token": 0.0},
    ]
    assert all(type(value) is float for row in scores for value in row.values())  # JSON-ready, no tensors
    with pytest.raises(ValueError, match="2 metric names for 3 items"):
        metrics.row_scores(["a", "b"], predicted, labels, exact_match)


def test_accuracies_read_only_the_positions_before_a_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    assert metrics.scored_positions(labels).tolist() == [[False, True, True, False, False],
                                                         [True, False, False, False, False]]
    predicted = torch.tensor([[0, 5, 6, 0, 0], [7, 0, 0, 0, 0]])
    unset = torch.where(metrics.scored_positions(labels), predicted, -1)  # nothing else computed
    for definition, values in metrics.both_accuracies(unset, labels).items():
        assert torch.equal(values, metrics.both_accuracies(predicted, labels)[definition])
    assert metrics.accuracy_of_ids(unset, labels, exact_match=True).tolist() == [1.0, 1.0]
