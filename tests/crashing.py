"""A data set that fails part-way through a run: the crash the resume tests recover from."""

from torch.utils.data import Dataset


class Killed(RuntimeError):
    pass


class DiesAfter(Dataset):
    """Wraps a data set and raises Killed once `limit` examples have been read: a crash mid-run."""

    def __init__(self, dataset, limit):
        self.dataset, self.limit, self.reads = dataset, limit, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise Killed("simulated crash")
        return self.dataset[i]
