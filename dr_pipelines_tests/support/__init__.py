"""Helpers shared by the tests (servers, configs, clusters); test modules never import each other."""
