"""The one list of config fields every recipe shares; configs/*.py start from here and override.

Config policy, followed by every recipe in configs/:
- Each field is defined once, here, with its default and a comment. The defaults are the paper's recipe:
  ViT-B/16 SimMIM pretraining (pretrain_config), ViT-B/16 fine-tuning (finetune_config), the
  BERT-base / RoBERTa-like masked-LM recipe (text_pretrain_config) and BERT's text classification fine-tuning
  (text_finetune_config).
- A recipe starts from one of these and sets ONLY what differs from it, so every value a recipe sets is a
  deliberate difference (tested: tests/test_configs.py). Its docstring gives the command, the expected
  runtime and result, and the paper's full recipe as text, so a reader sees the whole of it in one place.
Durations come as `*_steps` or `*_epochs` (one of the two); `resolve_steps` turns either into steps. The warmup
may also be a share of the run (optim.warmup_fraction; the comment above optim.warmup_steps gives the order).
Learning rates are per 512 images and scaled by the effective global batch, as in the paper.
"""
import ml_collections
from ml_collections import config_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_config() -> ml_collections.ConfigDict:
  """Every field of an image pretraining run, set to the paper's ViT-B/16 recipe values."""
  c = ml_collections.ConfigDict()
  c.task = 'pretrain'
  c.seed = 0
  c.batch_size = 2048  # global, per optimizer step (micro-batches x accum_steps)
  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'vit'  # vit | swin | swinv2
  c.model.variant = 'B/16'  # decoded from the family's one variant table
  c.model.style = 'beit'  # vit only: 'beit' (the official SimMIM ViT) or 'plain' (absolute pos. embedding)
  c.model.image_size = 224
  c.model.in_chans = 3
  c.model.drop_path_rate = 0.1
  c.model.window_size = 7  # swin only
  c.model.pretrained_window_sizes = config_dict.placeholder(tuple)  # swinv2 only; None: each stage's window
  # swin/swinv2: the official pretraining DOES decay relative_position_bias_table (and SwinV2's cpb_mlp and
  # logit_scale): its SimMIM wrapper prefixes the keywords with 'encoder.', so they never match. True exempts
  # them in pretraining too; fine-tuning always exempts them.
  c.model.exempt_keywords_in_pretraining = False
  c.model.dtype = 'float32'  # compute dtype; params and optimizer state stay float32
  # 'auto': cuDNN flash attention where it applies (NVIDIA GPU, bf16/fp16, head dim % 8 == 0 and <= 128, a bias
  # shared over the batch), XLA elsewhere; 'xla' always; 'cudnn' or an error saying why not.
  c.model.attention = 'auto'
  # Activation checkpointing per block: 'none', 'block' (recompute all), or a jax.checkpoint_policies name
  # ('dots_saveable', 'dots_with_no_batch_dims_saveable', ...): trades step time for activation memory.
  c.model.remat = 'none'

  c.mask = ml_collections.ConfigDict()
  c.mask.mask_ratio = 0.6
  c.mask.mask_patch_size = 32
  c.mask.model_patch_size = 16

  c.loss = ml_collections.ConfigDict()
  c.loss.norm_target = False  # SwinV2-B recipe: regress locally normalised pixels
  c.loss.norm_target_window = 47

  c.data = ml_collections.ConfigDict()
  # A tfds name; 'image_folder' (data_dir = root/<split>/<label>/*.jpg, or any folder of images without labels,
  # recursive, or a glob / comma-separated list / .txt list of files); or 'synthetic' (random images, the
  # same global batch for any process count: benchmarks and multi-process checks).
  c.data.name = 'imagenet2012'
  c.data.data_dir = config_dict.placeholder(str)  # None: the tfds default (~/tensorflow_datasets)
  c.data.split = 'train'
  c.data.shuffle_buffer = 16_384
  c.data.crop_scale = (0.67, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.prefetch = 2  # batches prepared ahead, on the host and again on the device
  c.data.threads = 0  # input pipeline threads (a private tf.data pool); 0: every core this process may use
  c.data.bad_images = 'skip'  # image_folder files that are no readable image: 'skip' (counted in the log) or 'fail'

  c.optim = ml_collections.ConfigDict()
  c.optim.schedule = 'multistep'  # multistep | cosine
  c.optim.base_lr = 1e-4  # per 512 images
  c.optim.warmup_lr = 5e-7  # per 512 images
  c.optim.min_lr = 5e-6  # per 512 images (cosine floor)
  # Warmup: the first of these three that is set. warmup_fraction is what the CPU recipes use: shortening a run
  # with --config.total_steps alone keeps its share. warmup_epochs is the paper's, exact; one that a shortened run
  # cannot fit becomes a tenth of the run, with a line saying so.
  c.optim.warmup_steps = config_dict.placeholder(int)
  c.optim.warmup_fraction = config_dict.placeholder(float)  # of total_steps, in [0, 1)
  c.optim.warmup_epochs = 10.0
  c.optim.warmup_prefix = False  # True: cosine over (total - warmup), as the Swin-Transformer copy does
  c.optim.milestone_epochs = (700.0,)  # multistep; or milestone_steps
  c.optim.milestone_steps = config_dict.placeholder(tuple)
  c.optim.gamma = 0.1
  # The official scheduler steps after the optimizer: update k runs at the schedule's k - 1 (warmup_lr at k = 0).
  c.optim.lr_lag = 1
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_grad = 5.0
  c.optim.accum_steps = 1

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**18  # arrays with fewer elements stay replicated

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.enable_async = True

  # Continued pretraining: start from another run's weights (a workdir, a checkpoint step dir, an exported .npz /
  # .safetensors; local or gs://) with a fresh optimizer and schedule; the model must be the same (one-line refusal
  # otherwise); text is tokenised with the source's own tokenizer. None: random initialisation. A restart of
  # this run resumes its own checkpoint, never the source again.
  c.init_from = config_dict.placeholder(str)

  c.log_every_steps = 50
  c.image_every_steps = 5000  # PNG grid of input / masked input / reconstruction
  return c


def steps_per_epoch_of(num_examples: int, batch_size: int) -> int:
  """Optimizer steps per epoch: the input drops each epoch's last partial batch; at least one."""
  return max(num_examples // batch_size, 1)


def resolve_steps(cfg: ml_collections.ConfigDict, name: str, steps_per_epoch: int) -> int:
  """`name_steps` if set, else round(`name_epochs` * steps_per_epoch)."""
  steps, epochs = cfg.get(f'{name}_steps'), cfg.get(f'{name}_epochs')
  if steps is not None:
    return int(steps)
  if epochs is None:
    raise ValueError(f'Set {name}_steps or {name}_epochs in the config.')
  return int(round(float(epochs) * steps_per_epoch))


def finetune_config() -> ml_collections.ConfigDict:
  """Every field of a fine-tuning or linear-probe run, set to the paper's ViT-B/16 fine-tuning recipe.

  The model, data, optim, mesh and checkpoint fields are the pretraining ones; the masking fields go.
  """
  c = pretrain_config()
  for name in ('mask', 'loss', 'image_every_steps'):
    del c[name]
  c.task = 'finetune'  # finetune | linear_probe
  # init_from (defined in pretrain_config): here the pretrained encoder, required unless from_scratch (checked at
  # start); also a timm folder or an official SimMIM / timm .pth / .safetensors.
  c.from_scratch = False  # True: the encoder starts from random initialisation (a baseline); init_from stays unset
  # How init_from's relative position tables follow a new window (6 -> 7, 12 -> 14): 'geometric' is SimMIM's
  # loader (geometric-progression offsets, cubic spline); 'bicubic' is the Swin-Transformer repository's.
  c.rel_pos_resize = 'geometric'
  c.num_classes = config_dict.placeholder(int)  # None: from the dataset
  # ViT head weight and bias x this at init (official: 0.001, after trunc_normal std .02). 1.0 is timm's plain
  # std .02 head: a from-scratch or few-hundred-step run learns faster with it (the CPU recipes).
  c.head_init_scale = 0.001
  c.total_epochs = 100.0
  c.eval_every_steps = config_dict.placeholder(int)  # None: once per epoch (and at the end)
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size

  c.data.eval_split = 'validation'  # evaluation: resize the shorter side to size / eval_crop_pct, centre crop
  # timm's crop_pct: the share of the resized shorter side the evaluation view keeps. 0.875 (224 of 256) is the
  # ImageNet recipes'; 1.0 (the whole image) where images are small and trained full-frame (the CPU recipes).
  c.data.eval_crop_pct = 0.875
  c.data.crop_scale = (0.08, 1.0)  # timm's RandomResizedCrop
  c.data.interpolation = 'bicubic'
  c.data.rand_augment = 'rand-m9-mstd0.5-inc1'  # timm RandAugment string; '' turns it off
  c.data.random_erasing = 0.25  # probability, 'pixel' mode

  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.label_smoothing = 0.1

  c.probe = ml_collections.ConfigDict()
  c.probe.block = config_dict.placeholder(int)  # ViT: features after this block (paper: 8 of ViT-B); None: last
  c.probe.batch_norm = True  # parameter-free BatchNorm before the head

  c.optim.schedule = 'cosine'
  c.optim.base_lr = 1.25e-3  # per 512 images: 5e-3 at 2048
  c.optim.warmup_lr = 2.5e-7
  c.optim.min_lr = 2.5e-7
  c.optim.warmup_epochs = 20.0
  c.optim.layer_decay = 0.65  # ViT-B; Swin-B 0.9 (100 ep) / 0.8 (800 ep); 1.0: off
  c.model.drop_path_rate = 0.1
  return c


def text_pretrain_config() -> ml_collections.ConfigDict:
  """Every field of a text pretraining run (masked tokens on packed sentencepiece rows), set to BERT-base
  sizes; the optimizer, mesh and checkpoint fields are the image ones. Learning rates are per 512 rows."""
  c = pretrain_config()
  for name in ('model', 'mask', 'loss', 'data', 'image_every_steps'):
    del c[name]
  c.model = ml_collections.ConfigDict()
  c.model.name = 'text'
  c.model.variant = 'base'  # decoded from models/text.py's variant table (tiny ... base, large)
  c.model.vocab_size = 32_000  # must equal the tokenizer's piece count
  c.model.max_len = 512  # learned positions
  c.model.mask_id = 3  # [MASK], as tools/train_tokenizer.py assigns it
  c.model.drop_path_rate = 0.1
  c.model.dtype = 'float32'
  c.model.attention = 'auto'  # as the image models
  c.model.remat = 'none'

  c.mask = ml_collections.ConfigDict()
  c.mask.mask_ratio = 0.15  # of each row's real tokens (ceil), as BERT
  c.mask.span = 1  # tokens per masked block (block masking on the 1-d grid); 1: single tokens
  c.mask.strategy = 'bert'  # 'bert': 80 % [MASK] / 10 % random / 10 % kept; 'mask_token': all [MASK]

  c.data = ml_collections.ConfigDict()
  c.data.name = 'c4'  # a tfds text dataset; 'pydoc_topics' (embedded); 'text_files' (data_dir/<split>/*.txt); 'synthetic'
  c.data.data_dir = config_dict.placeholder(str)
  c.data.split = 'train'
  c.data.eval_split = 'validation'  # held-out masked-token loss/accuracy/perplexity; None: no evaluation
  c.data.text_key = 'text'
  # A .model from tools/train_tokenizer.py (a run saves the one it used as workdir/tokenizer.model). With init_from:
  # None tokenises with the source's own; a different one is refused.
  c.data.tokenizer = config_dict.placeholder(str)
  c.data.seq_len = 512
  c.data.cache_dir = config_dict.placeholder(str)  # tokenised documents saved here and reused; None: in memory
  c.data.prefetch = 2

  c.optim.lr_lag = 0  # BERT and RoBERTa (fairseq) run update k at the schedule's value at k

  c.eval_every_steps = 10_000
  c.eval_batches = config_dict.placeholder(int)  # None: the whole held-out split (this process's share)
  return c


def text_finetune_config() -> ml_collections.ConfigDict:
  """Every field of a text classification run (task finetune or linear_probe): the fine-tuning fields with the
  text model and data, set to BERT's GLUE fine-tuning recipe (Devlin et al. 2019, A.3): batch 32, lr 2e-5,
  3 epochs, 10 % warmup then linear decay, weight decay 0.01, dropout 0.1, 128 tokens."""
  c = finetune_config()
  text = text_pretrain_config()
  for name in ('mixup', 'rel_pos_resize'):  # image-only
    del c[name]
  del c.probe['block']  # ViT only
  c.model = text.model  # as the pretraining run's (init_from must be the same model)
  c.data = text.data
  for name in ('cache_dir',):  # a labelled split is read whole and tokenised at the start
    del c.data[name]
  # 'medical_abstracts' (shipped: 5 conditions, offline); 'jsonl' (data_dir/<split>.jsonl or .jsonl.gz:
  # {"text": ..., "label": int id or class name} a line); 'text_folder' (data_dir/<split>/<label>/*.txt, one
  # example per file); or a prepared tfds text-classification dataset. Local or gs://.
  c.data.name = 'medical_abstracts'
  c.data.eval_split = 'test'  # evaluated every epoch; the best accuracy is kept in workdir/best
  c.data.label_key = 'label'  # the label's JSON key or tfds feature (text_key: the text's)
  c.data.seq_len = 128  # tokens per row: longer texts are truncated, shorter ones padded (segment 0)
  # Lines (or files) that are not JSON, have no text or an unknown label: 'skip' (counted in the log) or 'fail'
  # (one line naming the file and line). The image_folder switch of the same name.
  c.data.bad_images = 'skip'
  c.pool = 'mean'  # features pooled over the real tokens (padding never counted); 'first': the first token's
  c.head_dropout = 0.1  # before the head, as BERT's classifier
  c.head_init_scale = 1.0  # BERT's head: normal std .02
  c.total_epochs = 3.0
  c.batch_size = 32
  c.optim.schedule = 'linear'
  c.optim.base_lr = 3.2e-4  # per 512 rows: 2e-5 at 32
  c.optim.warmup_lr = 0.0
  c.optim.min_lr = 0.0
  c.optim.warmup_fraction = 0.1
  c.optim.weight_decay = 0.01
  c.optim.eps = 1e-6
  c.optim.clip_grad = 1.0
  c.optim.lr_lag = 0  # as text pretraining: update k at the schedule's value at k
  c.optim.layer_decay = 1.0  # off, as BERT; < 1 gives the embedding the lowest rate (optim.vit_layer_id)
  c.model.drop_path_rate = 0.0  # BERT's encoder has dropout, not drop path; the head's dropout is head_dropout
  return c
