import numpy as np
import pytest

from cxrloc import labels


def test_paper_order_and_box_findings():
    assert labels.FINDINGS[0] == "Atelectasis" and labels.FINDINGS[-1] == "Hernia"
    assert len(labels.FINDINGS) == 14 and len(set(labels.FINDINGS)) == 14
    assert labels.BOX_FINDINGS == (
        "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    )
    assert list(labels.SHORT_NAMES) == list(labels.FINDINGS)


def test_encode_decode_roundtrip():
    v = labels.encode("Mass|Effusion")
    assert v.dtype == np.uint8 and v.sum() == 2
    assert v[labels.FINDING_INDEX["Effusion"]] == 1 and v[labels.FINDING_INDEX["Mass"]] == 1
    assert labels.decode(v) == "Effusion|Mass"  # paper order
    assert labels.encode("No Finding").sum() == 0
    assert labels.decode(np.zeros(14)) == "No Finding"
    assert labels.encode(["Infiltrate"])[labels.FINDING_INDEX["Infiltration"]] == 1


@pytest.mark.parametrize("bad", ["Pneumonitis", "Mass|Foo", "No Finding|Mass"])
def test_encode_rejects_unknown(bad):
    with pytest.raises(labels.UnknownLabelError):
        labels.encode(bad)
