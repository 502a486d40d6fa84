"""quickstart-sklearn: multinomial logistic regression trained with ``solver="saga"``.

Modelled on Flower's ``quickstart-sklearn``: the model's arrays travel as
``ArrayRecord([coef_, intercept_])`` (keys ``"0"`` and ``"1"``), the client sets them on a
``warm_start`` model, fits for a few epochs and replies with the new ``coef_`` /
``intercept_``. With ``saga`` and more than two classes ``coef_`` comes back Fortran-ordered
float64 of shape ``(classes, features)``. The initial model is all zeros (every class equally
likely), as in the quickstart's ``set_initial_params``. ``app`` and ``topk_app`` as in
:mod:`.pytorch_cnn`.
"""

from __future__ import annotations

import warnings

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from flower_ext.mods import topk_mod

from .data import NUM_CLASSES, NUM_FEATURES, client_data, client_eval_data, held_out_data

LOCAL_EPOCHS = 2


def get_model(seed: int = 0) -> LogisticRegression:
    # max_iter = local epochs and warm_start, as the quickstart does; a fixed random_state
    # makes saga's sampling order, hence the update, a function of the global model only.
    return LogisticRegression(
        solver="saga", max_iter=LOCAL_EPOCHS, warm_start=True, random_state=seed
    )


def set_initial_params(model: LogisticRegression) -> None:
    model.classes_ = np.arange(NUM_CLASSES)
    model.coef_ = np.zeros((NUM_CLASSES, NUM_FEATURES))
    model.intercept_ = np.zeros((NUM_CLASSES,))


def get_model_params(model: LogisticRegression) -> list[np.ndarray]:
    return [model.coef_, model.intercept_]


def set_model_params(model: LogisticRegression, params: list[np.ndarray]) -> None:
    model.coef_ = params[0]
    model.intercept_ = params[1]


def _features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64)


def _model_from(arrays: ArrayRecord, seed: int = 0) -> LogisticRegression:
    model = get_model(seed)
    set_initial_params(model)
    set_model_params(model, arrays.to_numpy_ndarrays())
    return model


# The quickstart's ClientApp, and the same handlers behind flower-ext's top-k mod: the one
# change a project makes on the client to use TopKCompression on the server.
app = ClientApp()
topk_app = ClientApp(mods=[topk_mod])


@app.train()
@topk_app.train()
def train_handler(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    model = _model_from(msg.content["arrays"], seed=100 * server_round + partition_id)
    images, labels = client_data(partition_id)
    x = _features(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: few local epochs on purpose
        model.fit(x, labels)
    train_logloss = log_loss(labels, model.predict_proba(x), labels=model.classes_)
    content = RecordDict(
        {
            "arrays": ArrayRecord(get_model_params(model)),
            "metrics": MetricRecord(
                {"train_logloss": float(train_logloss), "num-examples": len(labels)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
@topk_app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    model = _model_from(msg.content["arrays"])
    images, labels = client_eval_data(partition_id)
    x = _features(images)
    loss = log_loss(labels, model.predict_proba(x), labels=model.classes_)
    metrics = {
        "test_logloss": float(loss),
        "accuracy": float(model.score(x, labels)),
        "num-examples": len(labels),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def initial_arrays() -> ArrayRecord:
    model = get_model()
    set_initial_params(model)
    return ArrayRecord(get_model_params(model))


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Flower's ``evaluate_fn``: the global model on the server's held-out set."""
    model = _model_from(arrays)
    images, labels = held_out_data()
    x = _features(images)
    loss = log_loss(labels, model.predict_proba(x), labels=model.classes_)
    return MetricRecord({"accuracy": float(model.score(x, labels)), "loss": float(loss)})
