"""Write worker/data/sample_events.jsonl, the bundled demo event set (deterministic).

Documents are assembled from hand-written sentence pools (English, Chinese, Spanish, Russian,
German; FAQs, recipes, travel notes, short articles) with a seeded RNG, then a few long English
handbooks larger than one default v4 chunk, then updates (version 2) and deletes.

    python bench/make_sample.py            # rewrite the bundled file
    python bench/make_sample.py --out F    # write elsewhere
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "worker" / "data" / "sample_events.jsonl"
SEED = 20240611
COLLECTION = "demo"
LONG_DOC_MIN_TOKENS = 9_000  # comfortably over one v4 chunk (8,192 per row)

# Slot values per language; a sentence may use {product}, {city}, {dish}, {topic}.
SLOTS = {
    "en": {
        "product": ["the Aurora desk lamp", "the Nimbus kettle", "the Trail 40 backpack", "the Echo speaker"],
        "city": ["Lisbon", "Kyoto", "Valparaíso", "Tbilisi", "Hanoi", "Edinburgh"],
        "dish": ["lentil soup", "lemon risotto", "roast cauliflower", "banana bread", "chicken curry"],
        "topic": ["vector search", "battery storage", "urban beekeeping", "sleep research", "open data"],
    },
    "zh": {
        "product": ["智能台灯", "电热水壶", "登山背包", "蓝牙音箱"],
        "city": ["杭州", "成都", "西安", "大理", "厦门", "桂林"],
        "dish": ["番茄炒蛋", "红烧肉", "麻婆豆腐", "清蒸鱼", "酸辣汤"],
        "topic": ["向量检索", "储能电池", "城市养蜂", "睡眠研究", "开放数据"],
    },
    "es": {
        "product": ["la lámpara Aurora", "el hervidor Nimbus", "la mochila Trail 40", "el altavoz Echo"],
        "city": ["Sevilla", "Cusco", "Oaxaca", "Valparaíso", "Granada", "Cartagena"],
        "dish": ["la tortilla de patatas", "el gazpacho", "las lentejas", "el arroz con pollo"],
        "topic": ["la búsqueda vectorial", "las baterías", "la apicultura urbana", "el sueño"],
    },
    "ru": {
        "product": ["настольная лампа Aurora", "чайник Nimbus", "рюкзак Trail 40"],
        "city": ["Казань", "Санкт-Петербург", "Калининград", "Иркутск"],
        "dish": ["борщ", "гречневая каша", "сырники", "пельмени"],
        "topic": ["векторный поиск", "аккумуляторы", "сон"],
    },
    "de": {
        "product": ["die Aurora-Leuchte", "der Nimbus-Wasserkocher", "der Trail-40-Rucksack"],
        "city": ["Leipzig", "Freiburg", "Hamburg", "Bamberg"],
        "dish": ["Linsensuppe", "Kartoffelsalat", "Apfelstrudel", "Käsespätzle"],
        "topic": ["Vektorsuche", "Batteriespeicher", "Schlafforschung"],
    },
}

TITLES = {
    "en": {
        "faq": "Frequently asked questions about {product}",
        "recipe": "How to make {dish} at home",
        "travel": "Travel notes: three days in {city}",
        "article": "A short introduction to {topic}",
    },
    "zh": {
        "faq": "{product}常见问题解答",
        "recipe": "家常{dish}的做法",
        "travel": "{city}三日游记",
        "article": "{topic}入门简介",
    },
    "es": {
        "faq": "Preguntas frecuentes sobre {product}",
        "recipe": "Cómo preparar {dish} en casa",
        "travel": "Notas de viaje: tres días en {city}",
        "article": "Una breve introducción a {topic}",
    },
    "ru": {
        "faq": "Частые вопросы: {product}",
        "recipe": "Как приготовить {dish} дома",
        "travel": "Путевые заметки: {city}",
    },
    "de": {
        "faq": "Häufige Fragen: {product}",
        "recipe": "So gelingt {dish} zu Hause",
        "article": "Eine kurze Einführung in {topic}",
    },
}

POOLS = {
    "en": {
        "faq": [
            "How long does shipping take? Orders placed before noon usually leave our warehouse the same day.",
            "Can I return {product} if I change my mind? Yes, unused items can be returned within 30 days.",
            "The warranty covers manufacturing defects for two years from the date of purchase.",
            "To reset {product}, hold the power button for ten seconds until the light blinks twice.",
            "Replacement parts are listed on the support page together with their order numbers.",
            "We do not charge a restocking fee, but the original packaging helps us process returns faster.",
            "If the device does not turn on, check that the cable is firmly seated and try another outlet.",
            "Firmware updates are installed automatically overnight when the device is connected to Wi-Fi.",
            "You can clean the surface with a soft, slightly damp cloth; avoid solvents and abrasive sponges.",
            "Our support team answers emails within one business day, including during public holidays.",
            "Gift receipts do not show the price, and the recipient can exchange the item in any store.",
            "Bulk orders of more than fifty units qualify for a discount; contact our sales team for a quote.",
            "The product ships with a quick-start guide, and a longer manual can be downloaded as a PDF.",
            "Is {product} safe to use around children? Yes, but keep small parts away from toddlers.",
        ],
        "recipe": [
            "Start by rinsing the vegetables and chopping them into pieces of roughly the same size.",
            "Warm two tablespoons of olive oil in a heavy pan over medium heat.",
            "Add the onion and a pinch of salt, and cook until it is soft and translucent.",
            "Stir in the garlic and spices and let them cook for one minute, until fragrant.",
            "Pour in the stock, bring it to a gentle simmer and cover the pan with a lid.",
            "Taste the {dish} after twenty minutes and adjust the seasoning with salt, pepper or lemon.",
            "If the sauce is too thick, loosen it with a splash of hot water.",
            "Leftovers keep well in the fridge for three days and taste even better the next day.",
            "For a vegetarian version, replace the meat with chickpeas or roasted mushrooms.",
            "Serve the {dish} with crusty bread, steamed rice or a simple green salad.",
            "A handful of fresh herbs added at the very end brightens the whole dish.",
            "Do not rush the browning step, because it builds most of the flavour.",
            "This recipe serves four people and takes about forty-five minutes from start to finish.",
        ],
        "travel": [
            "We arrived in {city} late in the evening and walked straight to a small family-run guesthouse.",
            "The old town is best explored on foot, early in the morning before the tour groups arrive.",
            "Public transport is cheap and reliable, and a day pass covers buses, trams and the ferry.",
            "Lunch at the covered market was the highlight of the day: fresh bread, cheese and grilled fish.",
            "In the afternoon we climbed to the viewpoint above {city} and watched the light change over the roofs.",
            "Many museums are free on the first Sunday of the month, so plan your visit around it if you can.",
            "The weather changed quickly, so a light rain jacket was never far from our backpacks.",
            "Locals were patient with our clumsy attempts at the language and happy to give directions.",
            "We took a day trip by train to a nearby village known for its ceramics and its quiet beach.",
            "Evenings in {city} start late; restaurants fill up after nine and stay lively past midnight.",
            "If you have only three days, skip the big shopping streets and spend the time in the neighbourhoods.",
            "Book the popular tours a week in advance, especially during school holidays.",
        ],
        "article": [
            "Over the last decade, {topic} has moved from research labs into everyday products.",
            "The basic idea is simple, but the engineering details decide whether a system works in practice.",
            "Researchers usually measure progress with shared benchmarks, which makes results comparable.",
            "Critics point out that benchmarks rarely capture the messy conditions of the real world.",
            "Costs have fallen sharply, and that has opened the field to small teams and hobbyists.",
            "A common mistake is to optimise one number while ignoring reliability and maintenance.",
            "Several cities now publish open guidelines describing how {topic} should be used responsibly.",
            "The next step is likely to be better tooling rather than a single dramatic breakthrough.",
            "Good documentation and honest error messages matter as much as raw performance.",
            "Experts agree that long-term data will be needed before drawing firm conclusions.",
            "For newcomers, the best way to learn is to build a small project and measure it carefully.",
            "Public interest in {topic} tends to rise and fall with headlines, while steady work continues.",
        ],
    },
    "zh": {
        "faq": [
            "下单后多久发货？工作日中午十二点前的订单通常当天发出。",
            "{product}支持七天无理由退货，商品需保持完好并附带原包装。",
            "保修期为两年，涵盖正常使用下出现的质量问题。",
            "如果设备无法开机，请先检查电源线是否插紧，再换一个插座试试。",
            "长按电源键十秒，指示灯闪烁两次后即可恢复出厂设置。",
            "固件会在夜间联网时自动更新，无需手动操作。",
            "清洁时请使用柔软的湿布，不要使用酒精或其他腐蚀性清洁剂。",
            "客服邮箱会在一个工作日内回复，节假日也不例外。",
            "购买五十件以上可以享受批量折扣，请联系销售团队获取报价。",
            "包装内附有快速入门指南，完整的说明书可以在官网下载。",
            "配件和易损件可以在售后页面单独购买。",
            "请问{product}可以带上飞机吗？可以，但内置电池需要随身携带。",
        ],
        "recipe": [
            "先把食材洗净，切成大小均匀的块，这样更容易熟透。",
            "锅中倒入两勺油，中火烧热。",
            "放入葱姜蒜爆香，注意不要炒糊。",
            "加入主料翻炒均匀，再淋入少许生抽和料酒。",
            "倒入适量清水，大火烧开后转小火慢炖二十分钟。",
            "出锅前尝一下{dish}的味道，根据口味加盐或糖调整。",
            "如果汤汁太稠，可以加一点热水稀释。",
            "这道菜适合搭配米饭，也可以配面条。",
            "剩菜放入冰箱冷藏可以保存三天，第二天吃味道更好。",
            "最后撒上一把葱花，颜色和香气都会更好。",
            "火候是关键，不要着急翻炒，让食材充分上色。",
            "这份{dish}大约可供四人食用，全程需要四十分钟左右。",
        ],
        "travel": [
            "我们傍晚抵达{city}，入住了一家安静的民宿。",
            "老城区最适合步行游览，建议早上游客不多时出发。",
            "当地公共交通便宜又方便，一张日票可以乘坐公交和地铁。",
            "中午在菜市场附近的小馆子吃了一碗面，味道非常地道。",
            "下午我们登上山顶，俯瞰整座{city}的风景。",
            "很多博物馆每周一闭馆，出发前最好查一下开放时间。",
            "天气变化很快，随身带一件薄外套比较稳妥。",
            "当地人非常热情，看我们迷路主动上前指路。",
            "第二天我们坐火车去了附近的古镇，那里以陶瓷和茶叶闻名。",
            "{city}的夜生活很丰富，夜市一直热闹到深夜。",
            "如果只有三天时间，建议少逛商场，多走走老街小巷。",
            "热门景点最好提前一周在网上预约门票。",
        ],
        "article": [
            "过去十年里，{topic}已经从实验室走进了日常生活。",
            "基本原理并不复杂，但工程细节决定了系统能否真正落地。",
            "研究人员通常使用公开的基准测试来衡量进展。",
            "也有人指出，基准测试很难反映真实环境中的复杂情况。",
            "随着成本大幅下降，小团队和个人爱好者也能参与其中。",
            "常见的误区是只盯着一个指标，而忽视了稳定性和维护成本。",
            "一些城市已经发布了关于{topic}的使用指南。",
            "接下来的进步更可能来自更好的工具，而不是某个突破性的发现。",
            "清晰的文档和准确的错误提示与性能同样重要。",
            "专家认为，需要长期的数据积累才能得出可靠的结论。",
            "对于初学者来说，最好的学习方法是动手做一个小项目并认真测量。",
        ],
    },
    "es": {
        "faq": [
            "¿Cuánto tarda el envío? Los pedidos realizados antes del mediodía suelen salir el mismo día.",
            "Puedes devolver {product} sin usar en un plazo de treinta días.",
            "La garantía cubre defectos de fabricación durante dos años desde la fecha de compra.",
            "Para reiniciar el aparato, mantén pulsado el botón de encendido durante diez segundos.",
            "Si el dispositivo no enciende, comprueba el cable y prueba con otro enchufe.",
            "Las actualizaciones se instalan automáticamente por la noche cuando hay conexión wifi.",
            "Limpia la superficie con un paño suave y ligeramente húmedo; evita los disolventes.",
            "Nuestro equipo de soporte responde a los correos en un día laborable.",
            "Los pedidos de más de cincuenta unidades tienen descuento; pide un presupuesto a ventas.",
            "El manual completo se puede descargar en PDF desde la página de soporte.",
            "Las piezas de repuesto aparecen en la web junto con su número de referencia.",
            "¿Es seguro usar {product} cerca de niños? Sí, pero guarda las piezas pequeñas.",
        ],
        "recipe": [
            "Lava bien las verduras y córtalas en trozos de tamaño parecido.",
            "Calienta dos cucharadas de aceite de oliva en una cazuela a fuego medio.",
            "Añade la cebolla con una pizca de sal y cocínala hasta que esté transparente.",
            "Incorpora el ajo y las especias y rehoga un minuto, hasta que suelten su aroma.",
            "Vierte el caldo, lleva a ebullición suave y tapa la cazuela.",
            "Prueba {dish} a los veinte minutos y ajusta la sal y la pimienta.",
            "Si queda demasiado espeso, añade un chorrito de agua caliente.",
            "Las sobras se conservan en la nevera hasta tres días.",
            "Sirve {dish} con pan crujiente o una ensalada verde sencilla.",
            "Un puñado de perejil fresco al final le da mucha alegría al plato.",
            "No tengas prisa al dorar los ingredientes: ahí está gran parte del sabor.",
            "La receta es para cuatro personas y se prepara en unos cuarenta y cinco minutos.",
        ],
        "travel": [
            "Llegamos a {city} al anochecer y nos alojamos en una pequeña pensión familiar.",
            "El casco antiguo se recorre mejor a pie, temprano, antes de que lleguen los grupos.",
            "El transporte público es barato y un abono de un día cubre autobuses y tranvías.",
            "Comimos en el mercado central: pan recién hecho, queso y pescado a la plancha.",
            "Por la tarde subimos al mirador y vimos cómo cambiaba la luz sobre {city}.",
            "Muchos museos son gratuitos el primer domingo de cada mes.",
            "El tiempo cambiaba rápido, así que siempre llevábamos un chubasquero ligero.",
            "La gente fue muy amable y nos ayudó cada vez que nos perdimos.",
            "Hicimos una excursión en tren a un pueblo cercano famoso por su cerámica.",
            "En {city} se cena tarde; los restaurantes se llenan después de las nueve.",
            "Si solo tienes tres días, evita las calles comerciales y pasea por los barrios.",
            "Conviene reservar las visitas guiadas con una semana de antelación.",
        ],
        "article": [
            "En la última década, {topic} ha pasado de los laboratorios a los productos cotidianos.",
            "La idea básica es sencilla, pero los detalles de ingeniería deciden si funciona.",
            "Los investigadores miden el progreso con pruebas comunes que permiten comparar resultados.",
            "Los críticos señalan que esas pruebas rara vez reflejan las condiciones reales.",
            "Los costes han bajado mucho, y eso ha abierto el campo a equipos pequeños.",
            "Un error frecuente es optimizar una sola cifra y olvidar la fiabilidad.",
            "Varias ciudades ya publican guías abiertas sobre el uso responsable de {topic}.",
            "El próximo avance probablemente vendrá de mejores herramientas.",
            "Una buena documentación importa tanto como el rendimiento.",
            "Para aprender, lo mejor es construir un proyecto pequeño y medirlo con cuidado.",
        ],
    },
    "ru": {
        "faq": [
            "Сколько времени занимает доставка? Заказы, оформленные до полудня, отправляются в тот же день.",
            "Товар можно вернуть в течение тридцати дней, если он не был в использовании.",
            "Гарантия действует два года и распространяется на заводские дефекты.",
            "Чтобы сбросить настройки, удерживайте кнопку питания десять секунд.",
            "Если устройство не включается, проверьте кабель и попробуйте другую розетку.",
            "Служба поддержки отвечает на письма в течение одного рабочего дня.",
            "Протирайте корпус мягкой влажной тканью, не используйте растворители.",
            "Подробная инструкция доступна для скачивания на странице поддержки.",
        ],
        "recipe": [
            "Сначала вымойте овощи и нарежьте их кусочками одинакового размера.",
            "Разогрейте в кастрюле две столовые ложки масла на среднем огне.",
            "Обжарьте лук с щепоткой соли до мягкости.",
            "Влейте бульон, доведите до кипения и накройте крышкой.",
            "Через двадцать минут попробуйте блюдо и добавьте соль или перец по вкусу.",
            "Подавайте {dish} со сметаной и свежим хлебом.",
            "Остатки хорошо хранятся в холодильнике до трёх дней.",
            "Рецепт рассчитан на четыре порции и занимает около часа.",
        ],
        "travel": [
            "Мы приехали в {city} поздно вечером и остановились в небольшой гостинице.",
            "Старый город лучше всего осматривать пешком рано утром.",
            "Общественный транспорт недорогой, а проездной на день очень удобен.",
            "На обед мы зашли в маленькое кафе у рынка и не пожалели.",
            "Погода менялась быстро, поэтому лёгкая куртка всегда была с собой.",
            "Местные жители охотно подсказывали дорогу.",
            "Популярные экскурсии лучше бронировать за неделю.",
            "Вечером набережная наполняется людьми и музыкой.",
        ],
    },
    "de": {
        "faq": [
            "Wie lange dauert der Versand? Bestellungen vor zwölf Uhr verlassen das Lager meist am selben Tag.",
            "Unbenutzte Artikel können innerhalb von dreißig Tagen zurückgegeben werden.",
            "Die Garantie deckt Herstellungsfehler für zwei Jahre ab Kaufdatum ab.",
            "Halten Sie zum Zurücksetzen die Einschalttaste zehn Sekunden lang gedrückt.",
            "Wenn sich das Gerät nicht einschaltet, prüfen Sie bitte Kabel und Steckdose.",
            "Unser Support beantwortet E-Mails innerhalb eines Werktags.",
            "Reinigen Sie die Oberfläche mit einem weichen, leicht feuchten Tuch.",
            "Die ausführliche Anleitung steht als PDF zum Herunterladen bereit.",
        ],
        "recipe": [
            "Waschen Sie zuerst das Gemüse und schneiden Sie es in gleich große Stücke.",
            "Erhitzen Sie zwei Esslöffel Öl in einem schweren Topf bei mittlerer Hitze.",
            "Dünsten Sie die Zwiebel mit einer Prise Salz glasig an.",
            "Gießen Sie die Brühe an, lassen Sie alles aufkochen und legen Sie den Deckel auf.",
            "Schmecken Sie {dish} nach zwanzig Minuten mit Salz und Pfeffer ab.",
            "Reste halten sich im Kühlschrank bis zu drei Tage.",
            "Frische Kräuter zum Schluss machen das Gericht besonders aromatisch.",
            "Das Rezept reicht für vier Personen und dauert etwa eine Stunde.",
        ],
        "article": [
            "In den letzten zehn Jahren ist {topic} aus den Laboren in den Alltag gewandert.",
            "Die Grundidee ist einfach, doch über den Erfolg entscheiden die technischen Details.",
            "Forschende messen Fortschritte meist mit gemeinsamen Benchmarks.",
            "Kritiker bemängeln, dass Benchmarks die Wirklichkeit nur unvollständig abbilden.",
            "Die Kosten sind stark gesunken, wodurch auch kleine Teams mitmachen können.",
            "Gute Dokumentation ist ebenso wichtig wie reine Geschwindigkeit.",
            "Wer einsteigen will, baut am besten ein kleines Projekt und misst sorgfältig.",
            "Langfristige Daten werden nötig sein, bevor man sichere Schlüsse zieht.",
        ],
    },
}

UPDATE_NOTES = {
    "en": "Update: this page was revised to reflect the latest information.",
    "zh": "更新：本文内容已根据最新信息修订。",
    "es": "Actualización: esta página se ha revisado con la información más reciente.",
    "ru": "Обновление: страница исправлена с учётом последних данных.",
    "de": "Aktualisierung: Diese Seite wurde mit den neuesten Informationen überarbeitet.",
}
DOCS_PER_LANG = {"en": 104, "zh": 75, "es": 65, "ru": 25, "de": 25}  # + 6 long English documents
LONG_DOCS = 6
UPDATES = 30
DELETES = 15


def slots(rng: random.Random, lang: str) -> dict[str, str]:
    """One product, city, dish and topic per document, so its sentences agree with its title."""
    return {slot: rng.choice(values) for slot, values in SLOTS[lang].items()}


def paragraph(rng: random.Random, lang: str, topic: str, sentences: int, fill: dict) -> str:
    pool = POOLS[lang][topic]
    picked = rng.sample(pool, min(sentences, len(pool)))
    joiner = "" if lang == "zh" else " "
    return joiner.join(s.format(**fill) for s in picked)


def document(rng: random.Random, lang: str, topic: str, paragraphs: int) -> tuple[str, str]:
    fill = slots(rng, lang)
    title = TITLES[lang][topic].format(**fill)
    body = [paragraph(rng, lang, topic, rng.randint(2, 5), fill) for _ in range(paragraphs)]
    return title, "\n\n".join([title, *body])


def long_document(rng: random.Random, count_tokens) -> tuple[str, str]:
    """An English handbook: many sections over every topic, past LONG_DOC_MIN_TOKENS."""
    title = f"Field handbook, volume {rng.randint(1, 9)}"
    parts = [title]
    tokens = count_tokens(title)
    section = 0
    while tokens < LONG_DOC_MIN_TOKENS:
        section += 1
        topic = rng.choice(list(TITLES["en"]))
        fill = slots(rng, "en")
        heading = f"Section {section}. " + TITLES["en"][topic].format(**fill)
        paras = [paragraph(rng, "en", topic, rng.randint(3, 6), fill) for _ in range(rng.randint(2, 4))]
        text = "\n\n".join([heading, *paras])
        parts.append(text)
        tokens += count_tokens(text) + 1
    return title, "\n\n".join(parts)


def events(count_tokens) -> list[dict]:
    rng = random.Random(SEED)
    docs: list[dict] = []
    for lang, n in DOCS_PER_LANG.items():
        topics = list(TITLES[lang])
        for i in range(n):
            topic = topics[i % len(topics)]
            title, text = document(rng, lang, topic, rng.randint(1, 5))
            meta = {"lang": lang, "topic": topic, "title": title}
            docs.append({"doc_id": f"{lang}-{topic}-{i:04d}", "text": text, "metadata": meta})
    for i in range(LONG_DOCS):
        title, text = long_document(rng, count_tokens)
        meta = {"lang": "en", "topic": "handbook", "title": title}
        docs.append({"doc_id": f"en-handbook-{i:04d}", "text": text, "metadata": meta})

    out = [{"op": "upsert", "collection": COLLECTION, "version": 1, **d} for d in docs]
    updated = rng.sample(docs, UPDATES)
    for d in updated:
        lang, topic = d["metadata"]["lang"], d["metadata"]["topic"]
        if topic == "handbook":
            text = d["text"] + "\n\n" + UPDATE_NOTES[lang]
        else:
            _, fresh = document(rng, lang, topic, rng.randint(1, 3))
            text = "\n\n".join([UPDATE_NOTES[lang], d["text"], fresh.split("\n\n", 1)[1]])
        meta = {**d["metadata"], "revised": True}
        out.append(
            {
                "op": "upsert",
                "collection": COLLECTION,
                "version": 2,
                "doc_id": d["doc_id"],
                "text": text,
                "metadata": meta,
            }
        )
    updated_ids = {d["doc_id"] for d in updated}
    # Most deletes hit untouched documents; a few remove a document that was just updated.
    deleted = rng.sample([d for d in docs if d["doc_id"] not in updated_ids], DELETES - 3)
    deleted += rng.sample(updated, 3)
    for d in deleted:
        version = 3 if d["doc_id"] in updated_ids else 2
        out.append({"op": "delete", "collection": COLLECTION, "version": version, "doc_id": d["doc_id"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    from worker.tokens import count_tokens

    rows = events(count_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for event in rows:
            f.write(json.dumps(event, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {len(rows)} events to {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
