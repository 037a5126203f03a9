"""Vanilla federated LoRA: clients train A and B; the server averages each
factor separately, weighted by examples. Inexact: mean(B)·mean(A) is not
mean(B·A) once clients' A differ."""

from .. import wire
from .base import FedLoraStrategy


class LoraStrategy(FedLoraStrategy):
    name = "lora"
    exchange = wire.Exchange()
    exact_aggregation = False
