"""``hx.pl.explorer``: one Panel app over a predicted sample (spatial maps, attention, gallery, evaluation).

The app is a :class:`ExplorerState` (``param.Parameterized``: gene, layer, selected spot, colour
limits) wrapped by :class:`Explorer` (a thin ``pn.viewable.Viewer``), as hvPlot's explorer is: the
state can be driven and tested without a browser, and the same object renders inline in Jupyter
(``__panel__``), under ``panel serve`` (``.servable()``) or on its own server (``.serve()``).
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Sequence
from typing import Any, Literal

import param
from panel.viewable import Viewer

from hespotex._compat import renamed_arguments
from hespotex._constants import PREDICTION_KEY
from hespotex.pl._spatial import RASTERIZE_THRESHOLD, SpatialView, import_holoviews
from hespotex.pl._utils import Predictions, check_genes, get_predictions
from hespotex.tl.prediction._tables import prediction_records

logger = logging.getLogger("hespotex")

GENE_AUTOCOMPLETE = 500  # above this many genes the selector is a search box


class ExplorerState(param.Parameterized):
    """What the explorer shows; every view follows these parameters."""

    gene = param.Selector(objects=[], doc="Gene shown in the spatial panels.")
    layer = param.Selector(objects=[], doc="Prediction layer.")
    spot = param.String(default=None, allow_None=True, doc="Selected spot (obs name); its attention is shown.")
    clim = param.Range(default=None, allow_None=True, doc="Colour limits; None: 1st-99th percentile of the gene.")
    direction = param.Selector(objects=["in", "out"], default="in", doc="Attention into the spot, or out of it.")


class Explorer(Viewer):
    """Interactive explorer of a predicted sample. Build it with :func:`explorer`.

    Attributes
    ----------
    state
        The :class:`ExplorerState`; ``gene``, ``layer``, ``spot``, ``clim`` and ``direction`` are
        also readable and settable on the explorer itself.
    """

    state = param.ClassSelector(class_=ExplorerState, doc="Parameters every view follows.")

    @renamed_arguments("pl.Explorer")
    def __init__(
        self,
        sdata: Any,
        *,
        genes: Sequence[str] | None = None,
        gene: str | None = None,
        key: str = PREDICTION_KEY,
        layer: str | None = None,
        spot: str | None = None,
        truth: bool | str | None = "auto",
        rasterize: bool | Literal["auto"] = "auto",
        threshold: int = RASTERIZE_THRESHOLD,
        cmap: str = "viridis",
        width: int = 330,
        attention_width: int = 300,
        patches: Any = None,
        evaluation: Any = None,
        title: str | None = None,
        spread: bool | Literal["auto"] = "auto",
    ) -> None:
        pred = get_predictions(sdata, key=key, layer=layer)
        gene_list = check_genes(pred, genes)
        if gene is not None:
            check_genes(pred, [gene])
            if gene not in gene_list:
                gene_list = [gene, *gene_list]
        layers = _prediction_layers(pred)
        state = ExplorerState()
        state.param.gene.objects = gene_list
        state.param.layer.objects = layers
        state.param.update(gene=gene or gene_list[0], layer=pred.layer)
        super().__init__(state=state)
        self._data = sdata
        self._table_key = pred.table_key
        self._key = key
        self._preds: dict[str, Predictions] = {pred.layer: pred}
        self._views: dict[str, SpatialView] = {}
        self._view_kwargs = {
            "truth": truth,
            "rasterize": rasterize,
            "threshold": threshold,
            "cmap": cmap,
            "width": width,
            "spread": spread,
        }
        self._attention_width = attention_width
        self._patches, self._evaluation = patches, evaluation
        self.sample_id = pred.sample_id
        self.title = title or f"hespotex explorer: {self.sample_id}"
        self.tap_streams: list[Any] = []
        self._layout = None
        if spot is not None:
            self.spot = spot

    # ---------------------------------------------------------------- state shortcuts

    @property
    def gene(self) -> str:
        return self.state.gene

    @gene.setter
    def gene(self, value: str) -> None:
        check_genes(self.predictions, [value])
        self.state.gene = value

    @property
    def layer(self) -> str:
        return self.state.layer

    @layer.setter
    def layer(self, value: str) -> None:
        self.state.layer = value

    @property
    def spot(self) -> str | None:
        return self.state.spot

    @spot.setter
    def spot(self, value: str | int | None) -> None:
        if value is not None:
            from hespotex.pl._attention import spot_index

            value = str(self.predictions.table.obs_names[spot_index(self.predictions, value)])
        self.state.spot = value

    @property
    def clim(self) -> tuple[float, float] | None:
        return self.state.clim

    @clim.setter
    def clim(self, value: tuple[float, float] | None) -> None:
        self.state.clim = value

    # ---------------------------------------------------------------- data behind the views

    @property
    def predictions(self) -> Predictions:
        """The predictions of the current layer."""
        layer = self.state.layer
        if layer not in self._preds:
            self._preds[layer] = get_predictions(self._data, key=self._key, layer=layer, table_key=self._table_key)
        return self._preds[layer]

    @property
    def view(self) -> SpatialView:
        """The :class:`~hespotex.pl._spatial.SpatialView` of the current layer (spot positions, image, mode)."""
        layer = self.state.layer
        if layer not in self._views:
            self._views[layer] = SpatialView(self._data, self.predictions, **self._view_kwargs)
        return self._views[layer]

    @property
    def has_attention(self) -> bool:
        pred = self.predictions
        return pred.attention_key is not None and pred.attention_key in pred.table.obsp

    def select(self, x: float | None, y: float | None) -> str | None:
        """Select the spot nearest to ``(x, y)`` (sample coordinates), as a tap on a spatial panel does.
        Returns its id, or ``None`` (selection unchanged) when no spot is within a spot diameter."""
        if x is None or y is None:
            return None
        spot = self.view.nearest(float(x), float(y))
        if spot is not None:
            self.state.spot = spot
        return spot

    # ---------------------------------------------------------------- views

    def spatial_view(self):
        """The spatial panels of the current layer (an ``hv.Layout`` of DynamicMaps following the state);
        taps on them select spots."""
        hv = import_holoviews()
        layout = self.view.dynamic_layout(self.state)
        self.tap_streams = []
        for element in self.view.dynamic_panels.values():
            stream = hv.streams.Tap(source=element, x=None, y=None)
            stream.add_subscriber(self.select)
            self.tap_streams.append(stream)
        return layout

    def attention_view(self):
        """The attention view of the selected spot (``hv.Overlay``), ``None`` when no spot is selected."""
        from hespotex.pl._attention import attention

        if self.state.spot is None:
            return None
        return attention(
            self._data,
            self.state.spot,
            key=self._key,
            layer=self.state.layer,
            direction=self.state.direction,
            width=self._attention_width,
        )

    def spot_summary(self) -> str:
        """Markdown describing the selected spot (named in the page, so tests and users can see it)."""
        spot = self.state.spot
        agree = self.agreement_note(self.state.gene)
        tail = f"  \n{agree}" if agree else ""
        if spot is None:
            hint = "Tap a spot on a map to see the neighbours its prediction attends to."
            return f"**Selected spot:** none. {hint}{tail}"
        view, gene = self.view, self.state.gene
        df = view.frame(gene)
        row = df.iloc[int(self.predictions.table.obs_names.get_loc(spot))]
        values = " · ".join(f"{c} {gene}: {row[c]:.3f}" for c in view.columns)
        return f"**Selected spot:** `{spot}` · {values}" + tail

    def agreement_note(self, gene: str) -> str:
        """For an ensemble's prediction, the members' agreement on ``gene`` (``var[params["agreement_key"]]``, their
        mean pairwise Pearson across spots), which ranks genes by held-out accuracy; "" otherwise."""
        table, key = self.predictions.table, self.predictions.params.get("agreement_key")
        if not key or key not in table.var.columns or gene not in table.var_names:
            return ""
        value = float(table.var.loc[gene, key])
        if not math.isfinite(value):
            return ""
        return f"Members' agreement on {gene}: r = {value:.2f} (across genes, higher goes with better predictions)"

    def _attention_pane(self, spot: str | None, direction: str, layer: str):
        import panel as pn

        if not self.has_attention:
            return pn.pane.Markdown(
                "These predictions have no attention weights (a model without an attention decoder, "
                "such as the 'paper' preset).",
                width=self._attention_width,
            )
        if spot is None:
            return pn.pane.Markdown("", width=self._attention_width)
        # its own zoom: not linked to the maps' ranges
        return pn.pane.HoloViews(self.attention_view(), backend="bokeh", name="attention", linked_axes=False)

    def _spatial_pane(self, layer: str):
        import panel as pn

        return pn.pane.HoloViews(self.spatial_view(), backend="bokeh", name="spatial")

    def _extra_tabs(self) -> list[tuple[str, Any]]:
        tabs = []
        if self._patches is not None:
            try:
                from hespotex.pl._patches import diagnostic_patches
            except ImportError as err:
                logger.warning("The diagnostic-patch gallery is not available (%s).", err)
            else:
                tabs.append(("Diagnostic patches", diagnostic_patches(self._patches)))
        if self._evaluation is not None:
            try:
                from hespotex.pl._evaluation import evaluation
            except ImportError as err:
                logger.warning("The evaluation view is not available (%s).", err)
            else:
                tabs.append(("Evaluation", evaluation(self._evaluation)))
        return tabs

    def __panel__(self):
        import panel as pn

        if self._layout is not None:
            return self._layout
        state = self.state
        if len(state.param.gene.objects) > GENE_AUTOCOMPLETE:
            gene_widget = pn.widgets.AutocompleteInput.from_param(
                state.param.gene, options=list(state.param.gene.objects), restrict=True, min_characters=1, name="Gene"
            )
        else:
            gene_widget = pn.widgets.Select.from_param(state.param.gene, name="Gene")
        widgets = [gene_widget]
        if len(state.param.layer.objects) > 1:
            widgets.append(pn.widgets.Select.from_param(state.param.layer, name="Prediction layer"))
        widgets.append(pn.widgets.TextInput.from_param(state.param.spot, name="Spot", placeholder="tap a spot"))
        if self.has_attention:
            widgets.append(pn.widgets.RadioButtonGroup.from_param(state.param.direction, name="Attention"))
        summary = pn.pane.Markdown(
            pn.bind(
                lambda spot, gene, layer: self.spot_summary(), state.param.spot, state.param.gene, state.param.layer
            ),
            css_classes=["hx-selected-spot"],
            sizing_mode="stretch_width",
        )
        spatial = pn.panel(pn.bind(self._spatial_pane, state.param.layer))
        att = pn.panel(pn.bind(self._attention_pane, state.param.spot, state.param.direction, state.param.layer))
        main = pn.Row(spatial, pn.Column(att, name="attention"))
        tabs = [("Spatial", main), *self._extra_tabs()]
        body = pn.Tabs(*tabs, dynamic=True) if len(tabs) > 1 else main
        self._layout = pn.Column(
            pn.pane.Markdown(f"## {self.title}", css_classes=["hx-title"]),
            pn.Row(*widgets),
            summary,
            body,
            name=self.title,
        )
        return self._layout

    def servable(self, title: str | None = None, **kwargs: Any):
        """Mark the app for ``panel serve`` (page title: the sample id by default)."""
        return self.__panel__().servable(title=title or self.title, **kwargs)

    def serve(
        self,
        port: int = 0,
        *,
        address: str = "127.0.0.1",
        show: bool = False,
        threaded: bool = False,
        start: bool = True,
        **kwargs: Any,
    ):
        """Serve the explorer with Panel (Bokeh server) on ``address:port``.

        Binds to 127.0.0.1 by default (reachable from this machine only); ``port=0`` picks a free
        port. Websocket connections are accepted only from the served address. With
        ``threaded=True`` the server runs in a thread; stop it with ``server.stop()``.

        Returns
        -------
        The Panel server (``server.port`` is the port; its URL is logged).
        """
        import panel as pn

        if port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
                port = int(sock.getsockname()[1])
        origins = kwargs.pop("websocket_origin", [f"{address}:{port}", f"localhost:{port}"])
        logger.info("Serving the explorer of %s at http://%s:%d/", self.sample_id, address, port)
        return pn.serve(
            {"/": self.__panel__},
            port=port,
            address=address,
            show=show,
            threaded=threaded,
            start=start,
            title=kwargs.pop("title", self.title),
            websocket_origin=origins,
            **kwargs,
        )


def _prediction_layers(pred: Predictions) -> list[str]:
    table = pred.table
    layers = [pred.layer]
    layers += [name for name in prediction_records(table) if name not in layers]
    return layers


@renamed_arguments("pl.explorer")
def explorer(
    sdata: Any,
    *,
    genes: Sequence[str] | None = None,
    gene: str | None = None,
    key: str = PREDICTION_KEY,
    layer: str | None = None,
    spot: str | None = None,
    patches: Any = None,
    evaluation: Any = None,
    **kwargs: Any,
) -> Explorer:
    """An interactive explorer of a predicted sample: expression maps (and the ensemble's uncertainty), attention,
    gallery, evaluation.

    Tapping a spot on the maps selects it; the attention panel then shows the neighbours its
    prediction attends to. Display it in Jupyter, serve it with ``panel serve`` (``.servable()``)
    or with ``.serve()`` (127.0.0.1 only by default).

    Parameters
    ----------
    sdata
        A sample after ``hx.tl.predict`` (SpatialData, for the image; a prediction table works without one).
    genes
        Genes offered by the selector; default: every predicted gene.
    gene
        Gene shown first; default: the first of ``genes``.
    key, layer
        Which predictions: the ``key_added`` given to :func:`hespotex.tl.predict`, and optionally another
        layer of its table (see :func:`hespotex.pl.spatial`; ``key`` was ``table_key``).
    spot
        Spot selected at start.
    patches
        A result of ``hx.tl.diagnostic_patches``: adds a gallery tab (``hx.pl.diagnostic_patches``).
    evaluation
        Evaluation results (as ``hx.pl.evaluation`` takes them): adds an evaluation tab.
    **kwargs
        ``truth`` (formerly ``measured``, see :func:`hespotex.pl.spatial`), ``rasterize``, ``threshold``, ``cmap``,
        ``width``, ``attention_width``, ``title``, ``spread``: for an ensemble's prediction (which has
        ``layers[f"{key}_spread"]``, recorded as ``uns[key]["params"]["spread_layer"]``) a third map linked to
        the others shows the members' standard deviation of the gene per spot, and the selected spot's summary
        and the hover give it (``"auto"``, default; ``False`` hides it, ``True`` requires it).

    Returns
    -------
    An :class:`Explorer`. Reads the sample; writes nothing to it.
    """
    return Explorer(
        sdata,
        genes=genes,
        gene=gene,
        key=key,
        layer=layer,
        spot=spot,
        patches=patches,
        evaluation=evaluation,
        **kwargs,
    )
