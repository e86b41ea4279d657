import pytest

from trainer.memory.sizes import cap_fraction, parse_bytes


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * 2**30), ("512MB", 512 * 10**6), ("1.5e10", 15 * 10**9),
                                           (2**30, 2**30), ("4 gi", 4 * 2**30)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "16XB", "-1GB", "0"])
def test_parse_bytes_names_the_bad_text(text):
    with pytest.raises(ValueError, match="size|unit|positive"):
        parse_bytes(text)


def test_cap_fraction_from_bytes_or_fraction():
    assert cap_fraction("0.25", 80 * 2**30) == 0.25
    assert cap_fraction("20GiB", 80 * 2**30) == 0.25
    with pytest.raises(ValueError, match="not within"):
        cap_fraction("100GiB", 80 * 2**30)
