"""The early-bird search: importance (magnitude, Taylor, activation, gates), masks drawn at ratio p, the controller
that measures mask distances and declares the ticket, tickets themselves, and the collective steps that keep
processes in agreement."""
