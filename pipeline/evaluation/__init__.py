"""Evaluation of a trained pipeline: sample-quality metrics (torch-fidelity), classifiers (real-data
baseline, Classification Accuracy Score, rejection scores), reconstructions and the report."""
