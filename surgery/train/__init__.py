"""The small trainer for the SLM and bridge stages (loop, data, methods, score, ...).

`surgery.train(...)` is also the API function surgery.api.train: Python makes an imported
subpackage an attribute of its parent, which would hide a function of the same name, so this
package is callable and hands the call to surgery.api.train.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import train

        return train(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        from ..api import train

        return inspect.signature(train)


sys.modules[__name__].__class__ = _CallablePackage
