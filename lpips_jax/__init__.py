"""lpips-jax: the LPIPS perceptual distance (Zhang et al., CVPR 2018) in JAX, exact to the official `lpips` 0.1.4."""
from lpips_jax import metrics as metrics
from lpips_jax import stats as stats
from lpips_jax.lpips import distance as distance
from lpips_jax.lpips import distance_from_features as distance_from_features
from lpips_jax.lpips import features as features
from lpips_jax.modules import LPIPS as LPIPS
from lpips_jax.modules import NNXLPIPS as NNXLPIPS
from lpips_jax.pairwise import diversity as diversity
from lpips_jax.pairwise import pairwise as pairwise
from lpips_jax.scoring import score_pairs as score_pairs
from lpips_jax.weights import load as load

__all__ = ["LPIPS", "NNXLPIPS", "distance", "distance_from_features", "diversity", "features", "load", "metrics",
           "pairwise", "score_pairs", "stats"]
