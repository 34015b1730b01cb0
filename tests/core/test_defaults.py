"""One default per idea: SAM's radius is the same wherever a caller may leave it out."""
import inspect

from cfsam.core.defaults import DEFAULT_RHO
from cfsam.core.sam import SAM
from cfsam.training import zero
from cfsam.training.config import DEFAULTS
from cfsam.training.hf_trainer import SAMTrainerMixin


def test_every_sam_entry_point_defaults_to_the_papers_rho():
    assert DEFAULT_RHO == 2.0  # the paper's "reference value of rho = 2" (its Appendix, training settings)
    assert DEFAULTS["rho"] == DEFAULT_RHO
    for fn in (SAM.__init__, zero.ZeroSAM.__init__, SAMTrainerMixin.__init__):
        assert inspect.signature(fn).parameters["rho"].default == DEFAULT_RHO, fn.__qualname__
