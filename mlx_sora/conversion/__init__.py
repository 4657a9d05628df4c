"""Hugging Face checkpoints -> converted per-unit folders -> models: conversion (``hf``), the converted
folder and ``load_model`` (``loading``), int8/int4 weights (``quantization``), and which folder a model
name means (``registry``).
"""
