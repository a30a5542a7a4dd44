"""The length-generalisation suite: task grids from 1K to 16M tokens, scoring, tables and plots (DESIGN 9)."""
