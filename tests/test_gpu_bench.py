"""bench/gpu.py's stand-in for CIFAR-10 when none is at hand: a whole run on CIFAR's sizes."""
from grow.data import load_dataset
from tests.helpers import load_bench


def test_full_run_stand_in_reads_as_cifar10_of_the_asked_size():
    gpu = load_bench("gpu")
    folder = gpu.random_cifar_folder(1000, 200)
    splits = load_dataset("cifar10", folder, val_fraction=0.1, seed=0, download=False)
    assert len(splits.train) + len(splits.val) == 1000 and len(splits.test) == 200
    assert splits.info.input_shape == (3, 32, 32) and splits.info.num_classes == 10
    images, labels = splits.train.images, splits.train.labels
    assert images.float().std() > 50 and set(labels.unique().tolist()) == set(range(10))  # random pictures, every class
