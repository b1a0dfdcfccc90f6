"""The paper's own numbers (Hiasa et al. 2018), as printed in its Table 1 and its text.

Fig. 4 (MI) and Fig. 6 (Dice) are box plots without printed values: from them only the
text's statements (and, for Dice, the means ± SD it gives for the large set with GC, and the
MR-only baseline of the discussion) can be set beside ours.
"""

# Table 1: MAE and PSNR (0-255 scale) per test patient; columns (size, GC).
TABLE1_COLUMNS = (('small', False), ('small', True), ('large', False), ('large', True))
TABLE1 = {
    'mae_255': {'Patient #1': (30.121, 30.276, 26.899, 26.388),
                'Patient #2': (26.927, 26.911, 22.319, 21.593),
                'Patient #3': (33.651, 32.155, 29.630, 28.643),
                'Average ± SD': ('30.233 ± 2.177', '29.781 ± 1.777', '26.283 ± 1.367',
                                 '25.541 ± 1.129')},
    'psnr_255': {'Patient #1': (14.797, 14.742, 15.643, 15.848),
                 'Patient #2': (15.734, 15.628, 17.255, 17.598),
                 'Patient #3': (14.510, 14.820, 15.674, 15.950),
                 'Average ± SD': ('15.014 ± 0.330', '15.063 ± 0.380', '16.190 ± 0.273',
                                  '16.465 ± 0.296')},
}
# Cell of ours that each Table 1 column corresponds to.
TABLE1_CELLS = ('nogc_small', 'gc_small', 'nogc_large', 'gc_large')

# Section 3.2: Dice (mean ± SD, 10 labeled MR) with GC and >300 training volumes.
DICE_GC_LARGE = {'pelvis': (0.808, 0.036), 'femur': (0.883, 0.029),
                 'gluteus_medius': (0.804, 0.040), 'gluteus_minimus': (0.669, 0.054)}
# Discussion: 5-fold cross-validation of a U-Net on 10 labeled MR (8 train, 2 test).
DICE_MR_BASELINE = {'pelvis': (0.815, 0.046), 'femur': (0.921, 0.023),
                    'gluteus_medius': (0.825, 0.029), 'gluteus_minimus': (0.752, 0.045)}

# What the paper says for each of our questions (its data: 20 vs 302 MR + 613 CT volumes,
# 3 paired test patients, 10 + 20 unpaired test volumes, 10 labeled MR).
CLAIMS = {
    'more_data': 'Table 1: MAE fell and PSNR rose with more data (no test given); Fig. 4: MI '
                 'rose significantly with more data (p < 0.01); Fig. 6: Dice rose on pelvis, '
                 'femur, gluteus medius (p < 0.01) and gluteus minimus (p < 0.05).',
    'gc': 'Table 1: MAE fell and PSNR rose with GC on average (no test given); Fig. 4: GC '
          'raised MI between MR and sCT (p < 0.01); Fig. 6: GC raised Dice on the gluteus '
          'minimus (p < 0.01).',
    'signed': 'Not in the paper (its GC is the signed form; ours defaults to magnitudes).',
    'baseline': 'Discussion: the MR-only 5-fold U-Net was better than via synthesis on every '
                'structure (0.815 / 0.921 / 0.825 / 0.752 against 0.808 / 0.883 / 0.804 / '
                '0.669), no test given.',
    'upper_bound': 'Not in the paper.',
}
