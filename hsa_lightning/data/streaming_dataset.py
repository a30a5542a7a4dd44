"""mosaicml-streaming classes for the StreamingDataModule. Kept in their own module because
``import streaming`` takes seconds: the DataModule imports this only when it builds a dataset, and
worker processes (spawn or fork) unpickle the dataset by this module's name."""
from __future__ import annotations

from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.world import World


class IndexedStreamingDataset(StreamingDataset):
    """Samples carry their global id: it seeds synthetic replacements reproducibly."""

    def get_item(self, sample_id: int, retry: int = 7):
        return {"tokens": super().get_item(sample_id, retry)["tokens"], "sample_id": sample_id}


class ConsumptionLoader(StreamingDataLoader):
    """Its state counts the blocks the trainer used (``consumed``, advanced by the DataModule when a
    batch is transferred), not the ones workers or a prefetcher already produced."""

    consumed = 0

    def __iter__(self):
        self.consumed = 0
        yield from super().__iter__()

    def state_dict(self):
        return self.dataset.state_dict(self.consumed * World.detect().num_ranks, False)
