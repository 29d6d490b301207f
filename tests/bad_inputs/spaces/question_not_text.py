"""The question must be text: it heads the plan, the report and the MLflow parent's description."""
from sweeper.spaces import Sweep

SWEEP = Sweep(name="question_not_text", space={"model.arch": "smallcnn", "data.name": "digits"},
              question=5)
