"""Per-class look of the world: terrain style, materials and light. Keyed by the class names in
assets/world_classes.json (checked at import). Colours are sRGB hex; the renderer linearises them.
Ranges (lo, hi) are drawn per seed, so a class is a distribution of worlds, not one world."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .classes import CLASS_NAMES


@dataclass(frozen=True)
class Biome:
    # --- terrain (metres) ---------------------------------------------------------------
    lam0: float = 4000.0          # wavelength of the coarsest octave
    octaves: int = 13
    hill_amp: float = 200.0       # fbm hills
    mtn_amp: float = 0.0          # ridged multifractal mountains
    ridge_sharp: float = 2.0      # exponent on (1 - |n|): higher = knife-edge ridges
    mask_lam: float = 9000.0      # where mountains rise: smoothstep(lo, hi, noise)
    mask_lo: float = -0.3
    mask_hi: float = 0.4
    dune_amp: float = 0.0         # desert dunes
    dune_lam: float = 180.0
    mesa_amp: float = 0.0         # flat-topped buttes with cliffs (two levels), 0 = off
    mesa_lam: float = 3000.0
    cone: bool = False            # a volcano in view
    water_q: tuple | None = (0.15, 0.3)   # water level = this quantile of nearby heights; None = dry
    # --- materials ------------------------------------------------------------------------
    snow_q: tuple | None = None   # snow line = quantile of visible heights; (0, 0) = snow everywhere
    snow_jitter: float = 40.0     # snow line noise amplitude (m)
    tree_q: float = 0.8           # tree line quantile
    beach_h: float = 2.0          # beach height above water (m)
    rock_nz: float = 0.78         # normals with n_z below this are bare rock
    snow_rock_nz: float = 0.6     # ... above the snow line
    forest_thr: float = 0.05      # moisture threshold for forest (lower = more forest)
    forest_nz: float = 0.85
    canopy_h: float = 12.0        # forest canopy height above the ground (m)
    ground: str = "grass"         # what covers flat land away from water: grass, sand or rock
    grass: tuple = ("#5d8a2e", "#8a9a3c")
    forest: tuple = ("#1f4a22", "#2f5e26", "#355c2a")
    rock: tuple = ("#7a7068", "#5a544e")
    sand: tuple = ("#d8c08a", "#c9a872")
    snow: str = "#f4f7fb"
    water_deep: str = "#0e3550"
    water_shallow: str = "#2f7f86"
    water_clarity: float = 2.0    # metres of water until the bottom fades
    foam: float = 0.0             # shore foam strength
    strata: float = 0.0           # banded rock (desert mesas)
    # --- light & sky ------------------------------------------------------------------------
    sun_elev: tuple = (30.0, 55.0)    # degrees
    sun_az: tuple = (-150.0, 150.0)   # degrees, relative to the view direction
    sun_col: str = "#fff4e0"
    sun_int: float = 2.4
    amb_col: str = "#9cc0f0"
    amb_int: float = 0.55
    zenith: str = "#2d6fd1"
    horizon_sun: str = "#cfe2f6"
    horizon_away: str = "#b4d2f2"
    glow_col: str = "#fff2d6"
    glow: float = 0.6
    sky_grad: float = 3.0             # how fast the horizon colour gives way to the zenith
    fog_density: float = 1.0 / 9000.0  # per metre at the reference height
    fog_height: float = 900.0          # e-folding height of the haze
    fog_tint: str = ""                 # fog colour override (else the horizon colour)
    cloud_cover: tuple = (0.1, 0.5)
    cloud_lit: str = "#ffffff"
    cloud_dark: str = "#9aa8bf"
    cloud_lam: float = 2500.0
    cloud_stretch: float = 1.0        # > 1: streaky clouds
    night: bool = False               # stars and moon; the light is the moon's
    aurora: bool = False
    plume: bool = False               # an ash plume over the volcano
    exposure: float = 1.0


_ALPINE = Biome(
    lam0=7000.0, hill_amp=250.0, mtn_amp=2200.0, ridge_sharp=2.2, mask_lo=-0.5, mask_hi=0.3,
    water_q=(0.03, 0.18), snow_q=(0.55, 0.8), snow_jitter=110.0, tree_q=0.45, rock_nz=0.72, snow_rock_nz=0.55,
    forest_thr=-0.1, grass=("#56792f", "#7f8a45"), forest=("#1b3f22", "#24482a", "#2b4f28"),
    rock=("#7c7772", "#595653"), water_deep="#123f5a", water_shallow="#3a8a8f", cloud_cover=(0.05, 0.45),
)
_DESERT = Biome(
    lam0=6000.0, hill_amp=90.0, mtn_amp=0.0, mesa_amp=240.0, mesa_lam=3200.0,
    dune_amp=40.0, dune_lam=320.0, water_q=None, snow_q=None, rock_nz=0.8, forest_thr=9.0,
    ground="sand", sand=("#e0b97c", "#d09a5e"), rock=("#b4623a", "#8e4a2e"),
    grass=("#8c8a4a", "#a39a5a"), strata=1.0, cloud_cover=(0.0, 0.2), cloud_lam=3500.0,
    cloud_stretch=3.0,
)
_NOON = dict(sun_elev=(42.0, 62.0), sun_col="#fff8ea", sun_int=3.2, amb_col="#b7cbe6", amb_int=0.5,
             zenith="#3f7fd0", horizon_sun="#e6ecf2", horizon_away="#d3e0ee", glow=0.5,
             fog_density=1.0 / 7000.0, fog_height=1200.0)
_DUSK = dict(sun_elev=(2.0, 10.0), sun_az=(-55.0, 55.0), sun_col="#ff9a4a", sun_int=3.0,
             amb_col="#8a76b8", amb_int=0.45, zenith="#2a3778", horizon_sun="#ffa460",
             horizon_away="#c07a9a", glow_col="#ffb060", glow=1.6, sky_grad=2.2,
             cloud_lit="#ffb27a", cloud_dark="#6a4f78", fog_density=1.0 / 8000.0)

BIOMES: dict[str, Biome] = {
    "alpine day": _ALPINE,
    "alpine dusk": replace(_ALPINE, **_DUSK),
    "desert noon": replace(_DESERT, **_NOON),
    "desert dusk": replace(_DESERT, **{**_DUSK, "horizon_away": "#d9897a", "zenith": "#34407e",
                                       "amb_col": "#b09098", "amb_int": 0.55}),
    "tropical coast": Biome(
        lam0=5000.0, hill_amp=260.0, mtn_amp=650.0, mask_lo=-0.1, mask_hi=0.5, water_q=(0.5, 0.68),
        beach_h=5.0, rock_nz=0.7, forest_thr=-0.35, tree_q=1.0, foam=1.0,
        grass=("#4a8a30", "#7aa040"), forest=("#1a5a28", "#276a2a", "#347a2e"),
        sand=("#f2e3bd", "#e8d3a0"), water_deep="#08507a", water_shallow="#2fd0c8",
        water_clarity=5.0, sun_elev=(40.0, 70.0), sun_col="#fff8e8", sun_int=3.3, zenith="#1c66d6",
        horizon_sun="#d4ecfb", horizon_away="#b8dcf6", amb_col="#a8d0f4", cloud_cover=(0.25, 0.6),
        cloud_lam=1800.0, fog_density=1.0 / 12000.0,
    ),
    "temperate lakes": Biome(
        lam0=3500.0, hill_amp=230.0, mtn_amp=160.0, mask_lo=-0.3, mask_hi=0.5, water_q=(0.18, 0.35),
        beach_h=1.0, forest_thr=-0.05, tree_q=0.97, grass=("#588a34", "#7e9a48"),
        forest=("#1e4d24", "#2a5a2a", "#305e24"), water_deep="#17384a", water_shallow="#3d6e62",
        cloud_cover=(0.25, 0.65), cloud_dark="#8894a8",
    ),
    "autumn hills": Biome(
        lam0=3000.0, hill_amp=280.0, mtn_amp=220.0, mask_lo=-0.2, mask_hi=0.5, water_q=(0.02, 0.15),
        beach_h=0.8, forest_thr=-0.25, tree_q=0.98, grass=("#8a8a4a", "#a08c58"),
        forest=("#a0481e", "#c07a2a", "#3a5228"), rock=("#857a6e", "#635a52"),
        water_deep="#2a3a3e", water_shallow="#5a6a50", sun_elev=(14.0, 26.0), sun_col="#ffd9a0",
        sun_int=3.0, amb_col="#b0b8d0", zenith="#4a78c0", horizon_sun="#f4dcb8",
        horizon_away="#d8d8d8", glow_col="#ffe0a8", glow=0.9, fog_density=1.0 / 4500.0,
        fog_height=700.0, cloud_cover=(0.15, 0.5), cloud_lit="#fff0dc",
    ),
    "arctic night": Biome(
        lam0=6000.0, hill_amp=200.0, mtn_amp=1100.0, mask_lo=-0.2, mask_hi=0.5, water_q=(0.3, 0.5),
        snow_q=(0.0, 0.0), snow_jitter=0.0, rock_nz=0.7, snow_rock_nz=0.66, forest_thr=9.0, beach_h=0.0,
        rock=("#4e5560", "#3a4048"), snow="#eef4ff", water_deep="#06101c", water_shallow="#0e2432",
        sun_elev=(20.0, 40.0), sun_col="#a8c4ff", sun_int=0.33, amb_col="#3a5a9a", amb_int=0.12,
        zenith="#02050f", horizon_sun="#14254a", horizon_away="#0c1834", glow_col="#9ab8ff", glow=0.25,
        sky_grad=2.5, fog_density=1.0 / 14000.0, cloud_cover=(0.0, 0.3), cloud_lit="#4a5670",
        cloud_dark="#151c2c", night=True, aurora=True, exposure=1.4,
    ),
    "volcanic": Biome(
        lam0=5000.0, hill_amp=200.0, mtn_amp=900.0, ridge_sharp=1.6, mask_lo=-0.2, mask_hi=0.5,
        cone=True, water_q=(0.0, 0.2), beach_h=1.5, rock_nz=0.86, forest_thr=0.35, tree_q=0.5,
        ground="rock", grass=("#55663a", "#6a6c40"), forest=("#22361e", "#2a3e22", "#30422a"),
        rock=("#3c3a3a", "#56504a"), sand=("#2e2a28", "#403834"), water_deep="#0c1a22",
        water_shallow="#2a3a38", sun_elev=(8.0, 20.0), sun_az=(100.0, 260.0), sun_col="#ffc890",
        sun_int=3.2, amb_col="#8a8aa8", amb_int=0.35, zenith="#344a78", horizon_sun="#f0a070",
        horizon_away="#a08a90", glow_col="#ffa060", glow=1.0, sky_grad=2.4,
        fog_density=1.0 / 11000.0, fog_height=1000.0, cloud_cover=(0.1, 0.4), cloud_lit="#ffd0b0",
        cloud_dark="#5a5058", cloud_lam=2200.0, plume=True,
    ),
    "misty fjord": Biome(
        lam0=5000.0, hill_amp=200.0, mtn_amp=1800.0, ridge_sharp=1.8, mask_lo=-0.6, mask_hi=0.2,
        water_q=(0.3, 0.45), snow_q=(0.9, 0.97), rock_nz=0.55, snow_rock_nz=0.5, forest_thr=-0.35,
        forest_nz=0.62, tree_q=0.8, beach_h=0.5, grass=("#6a9a5a", "#8aa86a"),
        forest=("#2a4c3a", "#325a40", "#3a5a3a"), rock=("#8a8e94", "#6e737a"), water_deep="#1a2e3a",
        water_shallow="#3a5a5a", sun_elev=(5.0, 14.0), sun_az=(-100.0, 100.0), sun_col="#ffd0b8",
        sun_int=2.0, amb_col="#c0c8e0", amb_int=0.85, zenith="#6a88b8", horizon_sun="#f8d0c0",
        horizon_away="#c8c8d8", glow_col="#ffd8c0", glow=0.8, fog_density=1.0 / 2500.0,
        fog_height=260.0, fog_tint="#e0dce4", cloud_cover=(0.3, 0.7), cloud_lit="#fbe4dc",
        cloud_dark="#a0a4b8", cloud_stretch=2.5,
    ),
}

if sorted(BIOMES) != sorted(CLASS_NAMES):
    raise ValueError(f"biome table {sorted(BIOMES)} does not match world classes {sorted(CLASS_NAMES)}")
