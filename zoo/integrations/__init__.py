"""Adapters to outside frameworks.

Each adapter lives in its own module and imports its framework itself, so `import zoo` never needs one:
`import zoo.integrations.openmmlab` registers the backbones with mmengine (OpenMMLab's `custom_imports`).
"""
