"""The formats every layer speaks: errors, PEFT adapters, the federation protocol's names, the package
manifest and layout, atomic writes, the cache, and the schemas of files users edit.

Import-closed: nothing here imports the compiler, a runtime, torch at module level, or any layer above.
"""
