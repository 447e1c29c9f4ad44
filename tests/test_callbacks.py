import lightning as L
import torch
from PIL import Image

from mim.callbacks import ExportEncoder, ReconstructionImages
from mim.data import ImageDataModule
from mim.export import load_encoder
from mim.methods import MAE

SMALL = dict(
    backbone="vit_tiny_patch16_224", img_size=32, patch_size=4,
    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
)


def test_reconstruction_grid_and_export(tmp_path, shared_data):
    L.seed_everything(0)
    dm = ImageDataModule(root=str(shared_data), batch_size=10, num_workers=0, limit_per_class=1, val_limit_per_class=2)
    pictures, export = ReconstructionImages(num_images=6, scale=4), ExportEncoder()
    trainer = L.Trainer(
        max_epochs=1, callbacks=[pictures, export], default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, accelerator="cpu",
    )
    model = MAE(**SMALL)
    trainer.fit(model, dm)

    # 6 images evenly spaced over a class-ordered validation set of 20: several classes shown
    labels = [dm.val_set[i][1] for i in torch.linspace(0, 19, 6).round().long().tolist()]
    assert len(set(labels)) >= 5
    assert torch.equal(pictures.images[0], dm.val_set[0][0])
    png = Image.open(pictures.last_path)
    assert png.size == (3 * (32 * 4 + 2) + 2, 6 * (32 * 4 + 2) + 2)  # 3 columns, 6 rows, 4x enlarged

    encoder = load_encoder(export.path).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(imgs), model.encoder.eval().forward_features(imgs))
