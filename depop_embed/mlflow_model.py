"""The registered model's code: MLflow runs this file to build the pyfunc (models from code), so the
logged model holds no pickle."""

import mlflow

from depop_embed.registry import OpenClipEmbedder

mlflow.models.set_model(OpenClipEmbedder())
