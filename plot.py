"""loss.png from train.py's log.csv: the loss against the blend's, the kernel heads' health, the scores."""
import csv

from files import write_file


def smoothed(values, weight=0.98):
    """Exponential moving average, bias-corrected, so per-step noise does not hide the trend."""
    average, out = 0.0, []
    for count, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** count))
    return out


def plot_log(log_path, png_path):
    import matplotlib  # slow to import: only here
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(log_path) as file:
        rows = list(csv.DictReader(file))
    column = lambda key: [(int(r['step']), float(r[key])) for r in rows if r.get(key) not in (None, '', 'nan')]

    def curve(key):
        steps, values = list(zip(*column(key))) or [(), ()]
        return steps, smoothed(values)

    figure, (losses, heads, scores, buckets) = plt.subplots(1, 4, figsize=(20, 4))
    ratio = losses.twinx()
    for key, axis, style in (('loss', losses, 'C0'), ('blend_loss', losses, 'C7'), ('ratio', ratio, 'C3')):
        axis.plot(*curve(key), style, lw=1, label=key.replace('_', ' '))
    losses.set(xlabel='step', ylabel='L1 loss (smoothed)', title='training loss vs the blend on the same batches')
    ratio.set_ylabel('loss / blend loss', color='C3')
    losses.legend(loc='upper left')
    for key in (key for key in rows[0] if key.startswith('alive_')) if rows else ():
        heads.plot(*curve(key), lw=1, label=key.replace('_', ' '))
    heads.plot(*curve('constant_pixels'), 'k--', lw=1, label='pixels with every unit off')
    spread = heads.twinx()
    spread.plot(*curve('kernel_spread'), 'k', lw=1)
    spread.set(ylabel='kernel std across pixels', yscale='log')
    heads.set(xlabel='step', ylabel='alive share of the last ReLU', ylim=(0, 1), title='kernel heads')
    heads.legend(loc='lower left', fontsize=7)
    for key, label in (('val_psnr', 'validation patches'), ('val_blend_psnr', 'validation, blend'),
                       ('middlebury_psnr', 'Middlebury'), ('middlebury_blend_psnr', 'Middlebury, blend')):
        if points := column(key):
            scores.plot(*zip(*points), marker='o', label=label)
            scores.legend()
    scores.set(xlabel='step', ylabel='PSNR (dB)', title='evaluation')
    for key in (key for key in rows[0] if key.startswith('val_psnr_')) if rows else ():
        ours, blend = dict(column(key)), dict(column(key.replace('val_psnr_', 'val_blend_psnr_')))
        if steps := sorted(ours.keys() & blend.keys()):
            buckets.plot(steps, [ours[s] - blend[s] for s in steps], marker='o', label=key[len('val_psnr_'):])
            buckets.legend(title='motion (px)')
    buckets.axhline(0, color='k', lw=0.5)
    buckets.set(xlabel='step', ylabel='PSNR - blend PSNR (dB)', title='validation gain per motion bucket')
    figure.tight_layout()
    write_file(png_path, lambda temporary: figure.savefig(temporary, dpi=100, format='png'))
    plt.close(figure)
