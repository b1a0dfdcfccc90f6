"""CycleGAN + gradient-consistency (GC) loss: the paper's setting and its variants.

The default is the paper (Hiasa et al., "Cross-modality image synthesis from unpaired data
using CycleGAN", SASHIMI 2018): 256x256 slices, batch 1, ResNet-9 generators, 70x70 PatchGAN
discriminators, LSGAN, lambda_cycle = 3, lambda_GC = 0.3, Adam 2e-4 (beta1 0.5) constant for
100k steps then linear to zero over 100k more.

Usage:
  python -m mr2ct_jax.main --config=configs/gc.py --workdir=runs/gc          # the paper
  python -m mr2ct_jax.main --config=configs/gc.py:quick --workdir=runs/quick  # CPU, minutes
  python -m mr2ct_jax.main --config=configs/gc.py:nogc --workdir=runs/nogc    # ablation
  python -m mr2ct_jax.main --config=configs/gc.py:test --workdir=/tmp/t       # tests only

Any field can be overridden on the command line, e.g. `--config.loss.gc_weight=0`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

VARIANTS = ('paper', 'quick', 'nogc', 'test')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for a variant: '' / 'paper' (default), 'quick', 'nogc' or 'test'."""
  variant = (arg or 'paper').strip()
  if variant not in VARIANTS:
    raise ValueError(f'configs/gc.py: unknown variant {variant!r}; choose one of {VARIANTS}')

  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---- Data ---------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  # Directory written by `python -m mr2ct_jax.data.prepare`. Empty: the built-in phantom is
  # generated and prepared under WORKDIR/phantom (offline, deterministic from config.seed).
  data.dir = ''
  # Preprocessing, None = "as the dataset was prepared": a run takes each from its data dir's
  # dataset_meta.json and records the filled values in WORKDIR/config.json (translate and
  # evaluate apply those to new volumes); a value set here must equal the dataset's. `prepare`
  # and the built-in phantom use data.prepare_defaults for the fields left None.
  data.image_size = placeholder(int)       # network input (square); must be divisible by 4
  data.spacing_mm = placeholder(float)     # in-plane resampling (mm)
  data.mr_percentile = placeholder(float)  # MR normalisation anchor (see prepare_defaults)
  data.n4 = placeholder(bool)              # N4 bias correction of MR
  data.plane = placeholder(str)            # slice plane: 'axial', 'coronal' or 'sagittal'
  data.prepare_defaults = prep = ml_collections.ConfigDict()
  prep.image_size = 256           # 256 px * 1.25 mm = 320 mm (paper's MR FOV)
  prep.spacing_mm = 1.25
  # MR normalisation rule: the `mr_percentile` percentile of the body voxels maps to
  # mr_window[1] (100); MR has no absolute unit, so a robust body percentile is the anchor.
  prep.mr_percentile = 99.5
  prep.n4 = False                 # N4 bias correction of MR at prepare time (paper: on)
  # Slices of this patient plane (whatever the stored voxel order); the paper's MR were
  # acquired coronally, its CT resliced to match.
  prep.plane = 'axial'
  data.ct_window = (-150.0, 350.0)  # HU mapped to [0, 255] (paper); e.g. (-1024, 2000) keeps bone
  data.mr_window = (0.0, 100.0)     # normalised MR range mapped to [0, 255] (paper)
  # Augmentation (the reference's load 286 -> random crop 256): pad each slice by this
  # fraction of the size, then crop a random window back to image_size.
  data.crop_pad_fraction = 30 / 256
  data.flip_lr = True             # axial/coronal slices (sagittal ones have no L-R axis)
  data.num_workers = 0            # grain worker processes; 0 = in-process threads
  data.prefetch = 2               # batches read ahead
  # The built-in phantom (used when data.dir is empty).
  data.phantom = phantom = ml_collections.ConfigDict()
  phantom.num_train_mr = 20       # the paper's small setting: 20 MR + 20 CT volumes
  phantom.num_train_ct = 20
  phantom.num_labeled = 4
  phantom.num_test = 3            # paired MR/CT test subjects (the paper had 3)
  phantom.num_val = 1             # paired validation subjects, scored while training
  phantom.num_test_mr = 10        # unpaired test MR and CT (the paper: 10 and 20; MI, Fig. 4)
  phantom.num_test_ct = 20
  phantom.num_labeled_mr = 10     # labeled MR without CT (segmentation test, Fig. 6)
  phantom.num_slices = 24
  # Train on a subset of the prepared training patients (the paper's "20 vs >300 volumes"):
  # 0 = all. The subsets are nested (the 20 of a 20-volume run are among the 40 of a
  # 40-volume run) and depend only on subset_seed, not on config.seed, so runs that differ in
  # their seed or their losses train on the same patients. The chosen ids are recorded in
  # WORKDIR/config.json (data.train_patients).
  data.num_train_mr = 0
  data.num_train_ct = 0
  data.subset_seed = 0
  data.train_patients = placeholder(dict)  # filled at run start: {'train_mr': [...], ...}

  # ---- Model --------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.ngf = 64                  # generator base filters
  model.ndf = 64                  # discriminator base filters
  model.num_res_blocks = 9
  model.num_disc_layers = 3       # 3 stride-2 layers: the 70x70 PatchGAN
  model.disc_norm = 'instance'    # discriminator norm: 'instance' (the paper) or 'none'
  model.dtype = 'float32'         # compute dtype ('bfloat16' for mixed precision, params fp32)
  # Conv code path, not the function (mr2ct_jax/models/layers.py): 'auto' (the fastest
  # measured on the backend: 'winograd' on CPUs, 'matmul' elsewhere), 'winograd' (res-block
  # convs as Winograd F(2x2, 3x3)), 'matmul' (backward passes as im2col matmuls) or 'xla'
  # (XLA's own convs and gradients, e.g. cuDNN). Timings: README, Benchmarks.
  model.conv_impl = 'auto'

  # ---- Loss ---------------------------------------------------------------------------
  config.loss = loss = ml_collections.ConfigDict()
  loss.cycle_weight = 3.0         # lambda_Cycle
  loss.gc_weight = 0.3            # lambda_GC (0 disables the term)
  loss.identity_weight = 0.0      # the paper uses no identity loss
  loss.gc_signed = False          # False: correlate |gradient| (robust to MR/CT contrast inversion)
  loss.gc_eps = 1e-8

  # ---- Optimiser / schedule -----------------------------------------------------------
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 2e-4
  optim.b1 = 0.5
  optim.b2 = 0.999
  optim.decay_start_fraction = 0.5  # constant for this fraction of num_steps, then linear to 0

  # ---- Training loop ------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 200_000
  train.batch_size = 1            # global batch (split over devices and processes)
  train.pool_size = 50            # fake-image pool per discriminator
  # Decay of an exponential moving average of the generators' parameters, which translate,
  # evaluate and export then use (0: none, the paper's raw last weights).
  train.ema_decay = 0.0
  # Run G_ct/G_mr and D_ct/D_mr as one vmapped program per pair (same numbers): for GPUs,
  # where a batch-1 step is bound by kernel launches. Timings: README, Benchmarks.
  train.fuse_pairs = False
  train.log_every = 100
  train.image_every = 1000
  train.checkpoint_every = 5000
  train.keep_checkpoints = 3

  # ---- After training -----------------------------------------------------------------
  config.eval = ev = ml_collections.ConfigDict()
  ev.after_training = True        # translate + evaluate the paired test split at the end
  ev.batch_size = 8               # slices per generator call when translating
  # Test-time augmentation: every sCT / sMR (evaluation, translate, segmentation inputs) is
  # the average of G(x) and the mirror of G(mirrored x), the left-right flip the training
  # augmentation draws; twice the generator time. Off in the paper, on in `quick` (measured
  # there: README, Quality). `translate --flip_average` / `--noflip_average` override it.
  ev.flip_average = False
  # Validation while training: every this many steps (0 = never) score the `val` split
  # (prepare --val_dir) and write val/* scalars and an MR | sCT | CT image to TensorBoard.
  ev.every = 5000

  if variant == 'nogc':
    loss.gc_weight = 0.0
  elif variant == 'quick':
    # The whole pipeline on a 2-core CPU in a few minutes; learns visibly on the phantom.
    # 96 px at 3.33 mm (the paper's 320 mm field of view) with 2 slices per step, not 64 px
    # at 5 mm with 4: as many pixels per step, and on the AMD EPYC (2026-12-08, two seeds)
    # 88.5 -> 80.2 and 89.8 -> 86.4 HU inside the body (README, Quality).
    prep.image_size = 96
    prep.spacing_mm = 320.0 / 96
    # 24 + 24 training volumes, not 6 + 6: a supervised G trained on one subject's slices fit
    # them (51 HU) but scored 119-123 HU on the others, and 4x the volumes took the CycleGAN
    # from 112.8 to 105.9 HU at 800 steps (on other test subjects: the phantom numbers its
    # sets in turn). On fixed test subjects 48 + 48 or 96 + 96 gave no more (README, Quality).
    phantom.num_train_mr = 24
    phantom.num_train_ct = 24
    phantom.num_labeled = 2
    phantom.num_test = 2
    phantom.num_val = 1
    phantom.num_test_mr = 2
    phantom.num_test_ct = 2
    phantom.num_labeled_mr = 2
    phantom.num_slices = 12
    model.ngf = 16
    model.ndf = 16
    model.num_res_blocks = 3
    # 1600 steps, not 800: on a quiet 2-core AMD EPYC (2026-12-04) the doubled schedule took
    # the run from 142 s to 257 s and the sCT from 108.9 to 98.2 HU (13.6 -> 11.5 on 0-255),
    # with the femoral heads and iliac wings where the CT has them (README, Quality).
    train.num_steps = 1600
    # Translate with the average of the generators' recent weights: on the quiet EPYC
    # (2026-12-04) 98.2 -> 93.1 HU, 11.48 -> 10.47 on 0-255, at no cost in time. The
    # warm-up min(decay, (1 + t) / (10 + t)) keeps the window ~t / 9 steps (~180 at the end).
    train.ema_decay = 0.999
    # lambda_cycle 1, not the paper's 3 (measured, two seeds, the slower EPYC, 2026-12-07):
    # 93.1 -> 88.5 and 91.4 -> 89.8 HU; 0.5 was worse (98.9). Our reading, not measured: a
    # weaker cycle term asks the sCT to carry less of the MR (bias field, texture) for the way
    # back. README, Quality.
    loss.cycle_weight = 1.0
    train.batch_size = 2
    # The short schedule learns faster with a higher rate (measured: README, Benchmarks).
    optim.lr = 8e-4
    train.pool_size = 20
    train.log_every = 50
    train.image_every = 200
    train.checkpoint_every = 400
    ev.every = 400
    # The mirror average: on three quick runs (2026-12-08, AMD EPYC) 78.0 -> 76.3,
    # 86.4 -> 83.2 and (64 px) 88.5 -> 85.5 HU, for seconds of translation (README, Quality).
    ev.flip_average = True
  elif variant == 'test':
    # XLA's own convs: the tiny test programs compile ~4x faster than with the hand-written
    # conv paths, which tests/test_models.py, test_winograd.py, test_bf16.py and
    # test_train_step.py exercise directly.
    model.conv_impl = 'xla'
    # Set, not None: tests build networks and workdirs from this config directly.
    data.image_size = 32
    data.spacing_mm = 10.0
    data.mr_percentile = 99.5
    data.n4 = False
    data.plane = 'axial'
    phantom.num_train_mr = 2
    phantom.num_train_ct = 2
    phantom.num_labeled = 1
    phantom.num_test = 1
    phantom.num_val = 0
    phantom.num_test_mr = 0
    phantom.num_test_ct = 0
    phantom.num_labeled_mr = 0
    phantom.num_slices = 6
    model.ngf = 4
    model.ndf = 4
    model.num_res_blocks = 1
    train.num_steps = 4
    train.batch_size = 8            # divisible by the 8 fake CPU devices the tests use
    train.pool_size = 4
    train.log_every = 2
    train.image_every = 2
    train.checkpoint_every = 2
    ev.batch_size = 4
    ev.every = 0

  # ---- Downstream segmentation (python -m mr2ct_jax.segmentation) -----------------------
  # The paper's 2-D U-Net on two channels: trained on labeled CT + sMR = G_mr(CT), tested on
  # sCT = G_ct(MR) + MR (channel order CT-like, MR-like); Adam 1e-4 for 1e5 iterations.
  config.seg = seg = ml_collections.ConfigDict()
  seg.base_filters = 64           # U-Net filters at full resolution (Ronneberger: 64)
  seg.depth = 4                   # 2x2 poolings (64 -> 1024 filters); image_size % 2**depth == 0
  # Classes: None = the largest label value of the labeled split + 1 (set: checked >= that).
  seg.num_classes = placeholder(int)
  # Structure names: a file of `<value> <name>` lines or a JSON {value: name} (format:
  # mr2ct_jax/segmentation/labels.py); None: the phantom's (1 pelvis, 2 femur, 3 gluteus
  # medius, 4 gluteus minimus).
  seg.label_table = placeholder(str)
  seg.baseline_folds = 5          # k of the 1-channel MR baseline's cross-validation (paper: 5)
  seg.dtype = 'float32'           # compute dtype (params fp32)
  seg.lr = 1e-4                   # Adam (paper)
  seg.num_steps = 100_000         # iterations (paper)
  seg.batch_size = 8              # global batch of slices (split over devices and processes)
  seg.dice_loss_weight = 0.0      # softmax cross-entropy + this * (1 - mean soft Dice)
  seg.log_every = 100
  seg.checkpoint_every = 5000
  seg.keep_checkpoints = 3
  seg.eval_batch_size = 8         # slices per U-Net / generator call at test time
  if variant == 'quick':
    seg.base_filters = 16
    seg.depth = 3
    seg.num_steps = 400
    seg.dice_loss_weight = 1.0    # soft Dice helps the small muscles in a short run
    seg.log_every = 50
    seg.checkpoint_every = 200
  elif variant == 'test':
    seg.base_filters = 4
    seg.depth = 2
    seg.num_classes = 5           # set: tests build the U-Net from this config directly
    seg.lr = 1e-2                 # the 4-filter net visibly learns within a test's 20 steps
    seg.num_steps = 4
    seg.dice_loss_weight = 0.5
    seg.log_every = 2
    seg.checkpoint_every = 2
    seg.eval_batch_size = 4
  return config
