"""MLflow "models from code" entry: the registered model is this file plus its artifacts, not a pickle."""

import mlflow
from flowbp_ops.registry_model import FlowbpImageModel

mlflow.models.set_model(FlowbpImageModel())
