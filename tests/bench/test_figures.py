import pytest

from pqd.bench.figures import panels, pyplot


def test_panels_writes_the_figure_and_closes_it(tmp_path):
    plt = pyplot()
    before = len(plt.get_fignums())
    with panels(tmp_path / "f.png", 2, 3, (6, 4)) as (_fig, axes):
        assert axes.shape == (2, 3)
        axes[1][2].plot([0, 1], [1, 0])
    assert (tmp_path / "f.png").stat().st_size > 1000 and len(plt.get_fignums()) == before


def test_a_failed_drawing_leaves_the_earlier_figure_in_place(tmp_path):
    (tmp_path / "f.png").write_bytes(b"earlier")
    plt = pyplot()
    before = len(plt.get_fignums())
    with pytest.raises(KeyError), panels(tmp_path / "f.png", 1, 1, (3, 3)) as (_fig, axes):
        axes[0][0].plot([0, 1], [0, 1])
        raise KeyError("column")
    assert (tmp_path / "f.png").read_bytes() == b"earlier" and len(plt.get_fignums()) == before
