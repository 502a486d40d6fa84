"""quickstart-pytorch, with BatchNorm: a small CNN on 8x8 single-channel images.

Modelled on Flower's ``quickstart-pytorch`` (``task.py`` + ``client_app.py`` +
``server_app.py``): the ClientApp loads ``msg.content["arrays"].to_torch_state_dict()``,
trains, and replies ``ArrayRecord(model.state_dict())`` with ``train_loss`` and
``num-examples``; evaluation replies ``eval_loss``, ``eval_acc`` and ``num-examples``; the
server evaluates the global model on a held-out set in ``evaluate_fn``.

``BatchNorm2d`` brings ``running_mean`` / ``running_var`` float32 buffers and
``num_batches_tracked``, an int64 tensor of shape ``()``. Training is deterministic for a
given global model (seeded per client and round, one torch thread), so two strategies that
produce the same global model produce the same next round.

``app`` is the quickstart's ClientApp; ``topk_app`` has the same handlers behind
``mods=[topk_mod]``, the one client-side change top-k compression needs.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from flower_ext.mods import topk_mod

from .data import IMAGE_SIDE, NUM_CLASSES, client_data, client_eval_data, held_out_data

BATCH_SIZE = 32
LEARNING_RATE = 0.05
LOCAL_EPOCHS = 1


class Net(nn.Module):
    """Two conv + BatchNorm blocks and a linear head (about 1.6k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * (IMAGE_SIDE // 4) ** 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


def initial_model() -> Net:
    """The global model every strategy starts from (same seed, so the same weights)."""
    torch.manual_seed(0)
    return Net()


def _tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)


def train(net: Net, images: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """One local epoch of SGD with momentum; returns the mean training loss."""
    torch.set_num_threads(1)  # bit-reproducible CPU kernels
    x, y = _tensors(images, labels)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    net.train()
    total = 0.0
    for _ in range(LOCAL_EPOCHS):
        for start in range(0, len(y), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = criterion(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return total / (LOCAL_EPOCHS * len(y))


def test(net: Net, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Loss and accuracy of ``net`` on the given data."""
    torch.set_num_threads(1)
    x, y = _tensors(images, labels)
    net.eval()
    with torch.no_grad():
        logits = net(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        accuracy = float((logits.argmax(1) == y).float().mean())
    return loss, accuracy


def _load(msg: Message) -> Net:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())  # strict, as Flower's
    return net


# The quickstart's ClientApp, and the same handlers behind flower-ext's top-k mod: the one
# change a project makes on the client to use TopKCompression on the server.
app = ClientApp()
topk_app = ClientApp(mods=[topk_mod])


@app.train()
@topk_app.train()
def train_handler(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    net = _load(msg)
    images, labels = client_data(partition_id)
    server_round = int(msg.content["config"]["server-round"])
    train_loss = train(net, images, labels, seed=100 * server_round + partition_id)
    content = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            "metrics": MetricRecord({"train_loss": train_loss, "num-examples": len(labels)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
@topk_app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    net = _load(msg)
    images, labels = client_eval_data(partition_id)
    eval_loss, eval_acc = test(net, images, labels)
    metrics = {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(labels)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def initial_arrays() -> ArrayRecord:
    return ArrayRecord(initial_model().state_dict())


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Flower's ``evaluate_fn``: the global model on the server's held-out set."""
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(net, *held_out_data())
    return MetricRecord({"accuracy": accuracy, "loss": loss})
