import pytest
import torch

from zorro.models.routing import GROUPS, MASKINGS, OUTPUTS, Routing, TokenLayout, output_names

LAYOUT = TokenLayout.of(audio=5, fusion=2, video=7)


@pytest.mark.parametrize("masking", sorted(MASKINGS))
def test_attention_calls_cover_every_query_once_and_match_the_table(masking):
    routing = Routing.from_masking(masking)
    layout = LAYOUT if routing.has_fusion else TokenLayout.of(audio=5, video=7)
    calls = routing.attention_calls(layout)
    covered = [i for (qs, qe), _ in calls for i in range(qs, qe)]
    assert covered == list(range(layout.total))
    mask = routing.dense_mask(layout)
    for (qs, qe), (ks, ke) in calls:  # each call's key slice is exactly what the dense mask allows
        expected = torch.zeros(layout.total, dtype=torch.bool)
        expected[ks:ke] = True
        for q in range(qs, qe):
            assert torch.equal(mask[q], expected)


def test_input_level_is_one_dense_call_and_zorro_three():
    assert len(Routing.from_masking("input_level").attention_calls(LAYOUT)) == 1
    assert len(Routing.from_masking("zorro").attention_calls(LAYOUT)) == 3


def test_zorro_mask_is_eq1():
    mask = Routing.from_masking("zorro").dense_mask(LAYOUT)
    a, f, v = (slice(*LAYOUT.span(g)) for g in GROUPS)
    assert mask[a, a].all() and not mask[a, f].any() and not mask[a, v].any()
    assert mask[v, v].all() and not mask[v, a].any() and not mask[v, f].any()
    assert mask[f].all()


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="unknown masking"):
        Routing.from_masking("zoro")
    with pytest.raises(ValueError, match="read itself"):
        Routing(reads={"audio": ("video",), "video": ("video",)})
    with pytest.raises(ValueError, match="outside"):
        Routing(reads={"audio": ("audio", "text"), "video": ("video",)})
    with pytest.raises(ValueError, match="outside"):
        Routing(reads={"text": ("text",), "video": ("video",)})
    with pytest.raises(ValueError, match="non-empty"):
        Routing(reads={})
    with pytest.raises(ValueError, match="no row"):  # reads fusion, but the table has no fusion tokens
        Routing(reads={"audio": ("audio", "fusion"), "video": ("video",)})
    with pytest.raises(ValueError, match="needs a routing table"):
        Routing.from_masking("custom")
    with pytest.raises(ValueError, match="only used with masking 'custom'"):
        Routing.from_masking("zorro", {"audio": ["audio"], "video": ["video"]})
    with pytest.raises(ValueError, match="no 'fusion' tokens"):
        Routing.from_masking("two_streams").attention_calls(LAYOUT)
    with pytest.raises(ValueError, match="no 'fusion' tokens"):
        Routing.from_masking("two_streams").dense_mask(LAYOUT)


def test_custom_tables_may_be_non_contiguous_but_not_sliced():
    reads = {"audio": ["audio", "video"], "fusion": ["audio", "fusion", "video"], "video": ["video"]}
    routing = Routing.from_masking("custom", reads)
    assert routing.name == "custom" and routing.reads["audio"] == ("audio", "video")
    assert not routing.is_contiguous(LAYOUT)
    with pytest.raises(ValueError, match="not one contiguous slice.*flex or dense_mask"):
        routing.attention_calls(LAYOUT)
    mask = routing.dense_mask(LAYOUT)
    a, f, v = (slice(*LAYOUT.span(g)) for g in GROUPS)
    assert mask[a, a].all() and mask[a, v].all() and not mask[a, f].any()
    assert routing.attended_pairs(LAYOUT) == mask.sum()
    # without fusion tokens the same read set is one slice again
    assert Routing.from_masking("custom", {"audio": ["audio", "video"], "video": ["video"]}).is_contiguous(
        TokenLayout.of(audio=5, video=7))
    # a named masking written as a table is the same routing
    assert Routing.from_masking("custom", {"video": ["video"], "audio": ["audio"]}).key == \
        Routing.from_masking("two_streams").key


@pytest.mark.parametrize("masking", sorted(MASKINGS))
def test_attended_pairs_count_the_mask(masking):
    routing = Routing.from_masking(masking)
    layout = LAYOUT if routing.has_fusion else TokenLayout.of(audio=5, video=7)
    assert routing.attended_pairs(layout) == routing.dense_mask(layout).sum()


def test_output_names_follow_the_masking():
    assert output_names(Routing.from_masking("zorro")) == tuple(OUTPUTS)
    # Table 3: "the same number of outputs for fairness, except for the Two Streams which has two outputs"
    assert output_names(Routing.from_masking("two_streams")) == ("audio", "video")
    assert output_names(Routing.from_masking("input_level")) == tuple(OUTPUTS)


@pytest.mark.parametrize("masking,isolated", [("zorro", True), ("two_streams", True), ("input_level", False),
                                              ("bottleneck", False)])
def test_isolated_modalities(masking, isolated):
    routing = Routing.from_masking(masking)
    assert routing.isolated("audio") == routing.isolated("video") == isolated
    assert not routing.isolated("fusion") or masking == "two_streams"
