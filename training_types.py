"""Every training type, one line each: importing this module fills ``registry.REGISTRY``.

To add a training type, write its module (a ``Method``, a run function and a ``TrainingType``; see
docs/ADDING_A_METHOD.md) and add one line below.
"""
import train_at
import train_ce
import train_dih
import train_dist
import train_dkd
import train_fine_tune
import train_fitnets
import train_kd
import train_takd
from CRD import crd
from MHKD import mhkd
from dihkit.foundations.registry import REGISTRY, register
from TOFD import tofd

register(train_ce.TRAINING_TYPE)
register(train_fine_tune.TRAINING_TYPE)
register(train_kd.TRAINING_TYPE)
register(train_dih.TRAINING_TYPE)
register(train_dkd.TRAINING_TYPE)
register(train_dist.TRAINING_TYPE)
register(train_fitnets.TRAINING_TYPE)
register(train_takd.TRAINING_TYPE)
register(train_at.TRAINING_TYPE)
register(crd.TRAINING_TYPE)
register(tofd.TRAINING_TYPE)
register(mhkd.TRAINING_TYPE)

TRAINING_TYPES = REGISTRY
